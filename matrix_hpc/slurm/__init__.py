"""Running a job on a Slurm allocation: submit (submitit), Ray across the nodes, preemption and requeue."""

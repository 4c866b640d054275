"""TEMPORARY stand-in for matrix_hpc.store while it is being written. Delete when it lands."""
import json
import os
import pickle
import time
from pathlib import Path


class ResultWriter:
    def __init__(self, path): self.path = path; self.buf = []
    def append(self, tid, row_index, status, data): self.buf.append((tid, row_index, status, data))
    def flush(self):
        with open(self.path, "ab") as f:
            for r in self.buf: pickle.dump(r, f)
            f.flush(); os.fsync(f.fileno())
        self.buf = []
    @property
    def pending(self): return len(self.buf)

class RunStore:
    def __init__(self, d): self.run_dir = Path(d); m = json.loads((self.run_dir/"meta.json").read_text()); self.fingerprint = m["fp"]; self.total_tasks = m["total"]
    @classmethod
    def create(cls, run_dir, *, job_yaml, descriptor_set, payload_type, fingerprint, total_tasks):
        run_dir = Path(run_dir); run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir/"meta.json").write_text(json.dumps({"fp": fingerprint, "total": total_tasks})); return cls(run_dir)
    @classmethod
    def open(cls, run_dir):
        if not (Path(run_dir)/"meta.json").exists(): raise FileNotFoundError(run_dir)
        return cls(run_dir)
    def fingerprint_changes(self, new): return [k for k in set(new)|set(self.fingerprint) if new.get(k)!=self.fingerprint.get(k)]
    def writer(self, wid): return ResultWriter(self.run_dir/f"res-{wid}.pkl")
    def _rows(self):
        for p in self.run_dir.glob("res-*.pkl"):
            with open(p, "rb") as f:
                while True:
                    try: yield pickle.load(f)
                    except Exception: break
    def committed(self): return {r[0]: r[2] for r in self._rows()}
    def iter_results(self, status=None): return [r[3] for r in self._rows() if status is None or r[2]==status]
    def write_snapshot(self, tasks, *, meta):
        tmp = self.run_dir/"snap.tmp"; tmp.write_bytes(pickle.dumps((tasks, {**meta, "time": time.time()}))); tmp.rename(self.run_dir/"snap.pkl")
    def latest_snapshot(self):
        p = self.run_dir/"snap.pkl"; return pickle.loads(p.read_bytes()) if p.exists() else None
    def status(self):
        c = self.committed(); return {"total": self.total_tasks, "done": sum(1 for v in c.values() if v==2), "failed": sum(1 for v in c.values() if v==3)}
    def log_event(self, kind, **f):
        with open(self.run_dir/"events.jsonl","a") as fh: fh.write(json.dumps({"kind": kind, **f})+"\n")

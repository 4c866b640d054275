"""What the dataset checks at load cost: hashing and id-scan rates in MB/s, and a cached resume.

    python benchmarks/bench_dataset.py [--mb 256] [--row-bytes 1000]

Writes a JSONL dataset of about --mb MB (rows of about --row-bytes bytes) and a Parquet copy
to a temporary folder, then prints, all in this process (so the ratios compare like with like):
  * reading the file (the floor), and hashing it with sha256 / blake2b (/ blake3 if installed);
  * the loader's full first-load pass: digest + duplicate-id check (JSONL and Parquet);
  * a load with the digest cached in the run directory (what every resume pays).
The file was just written, so it is in the page cache: these are CPU rates, not disk rates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from matrix_hpc.job.dataset_checks import _scan, dataset_digest
from matrix_hpc.job.yamlpos import YamlWithLines


def write_dataset(folder: Path, mb: int, row_bytes: int) -> Path:
    path = folder / "data.jsonl"
    filler = "x" * max(0, row_bytes - 60)
    with path.open("w") as f:
        i = 0
        while f.tell() < mb * 1_000_000:
            f.write(json.dumps({"id": f"row-{i}", "text": filler, "n": i}) + "\n")
            i += 1
    return path


def rate(label: str, mb: float, fn) -> float:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    print(f"{label:<44} {dt:8.2f} s  {mb / dt:8.0f} MB/s")
    return dt


def hash_file(path: Path, make) -> str:
    h = make()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def spec_for(path: Path, id_field: str | None = "id") -> SimpleNamespace:
    return SimpleNamespace(dataset=SimpleNamespace(id_field=id_field, limit=None, path=path.name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--row-bytes", type=int, default=1000)
    args = ap.parse_args()
    doc = YamlWithLines("dataset: {id_field: id}\n", "job.yaml")
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp:
        folder = Path(tmp)
        path = write_dataset(folder, args.mb, args.row_bytes)
        mb = path.stat().st_size / 1e6
        rows = sum(1 for _ in path.open("rb"))
        print(f"JSONL dataset: {mb:.0f} MB, {rows} rows of ~{args.row_bytes} B")
        rate("read only (floor)", mb, lambda: hash_file(path, lambda: SimpleNamespace(
            update=lambda b: None, hexdigest=lambda: "")))
        rate("sha256 (hashlib, chosen)", mb, lambda: hash_file(path, hashlib.sha256))
        rate("blake2b (hashlib)", mb, lambda: hash_file(path, hashlib.blake2b))
        try:
            import blake3

            rate("blake3 (not a dependency)", mb, lambda: hash_file(path, blake3.blake3))
        except ImportError:
            print("blake3: not installed")
        rate("first load, no id field: digest only", mb, lambda: _scan(doc, spec_for(path, None), path))
        rate("first load, id field: digest + duplicate ids", mb, lambda: _scan(doc, spec_for(path), path))

        import pyarrow.json as pj
        import pyarrow.parquet as pq

        parquet = folder / "data.parquet"
        pq.write_table(pj.read_json(path), parquet)
        pmb = parquet.stat().st_size / 1e6
        rate(f"Parquet ({pmb:.0f} MB): digest + duplicate ids", pmb, lambda: _scan(doc, spec_for(parquet), parquet))

        run_dir = folder / "run"
        run_dir.mkdir()
        dataset_digest(doc, spec_for(path), path, run_dir)  # fills the cache
        t0 = time.perf_counter()
        for _ in range(100):
            dataset_digest(doc, spec_for(path), path, run_dir)
        print(f"{'resume, digest cached in the run dir':<44} {(time.perf_counter() - t0) / 100 * 1000:8.2f} ms")


if __name__ == "__main__":
    main()

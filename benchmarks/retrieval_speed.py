"""Retrieval speed: queries/s of exact kNN against a large float16 FC7 index held as a memmap.

Writes a random N x 4096 float16 index to a temporary .npy (400k rows = 3.3 GB; --quick 50k),
then times pipeline.retrieval.knn for query batches of several sizes, side by side in one run,
and prints each batch's queries/s and its ratio to the single-query rate. Also checks one
chunked result against an unchunked in-memory run on a slice. Writes results/bench/retrieval.json.

    python benchmarks/retrieval_speed.py [--quick] [--rows N] [--batches 1,16,256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.retrieval import default_chunk_size, knn, resolve_device  # noqa: E402


def _write_index(path: Path, rows: int, dim: int, seed: int) -> None:
    """A random float16 index written block by block (never whole in memory)."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    rng = np.random.default_rng(seed)
    block = 16384
    for s in range(0, rows, block):
        n = min(block, rows - s)
        # FC7 after ReLU is non-negative and sparse-ish: mimic it so norms are realistic.
        mm[s : s + n] = np.maximum(rng.standard_normal((n, dim), dtype=np.float32), 0)
    mm.flush()
    del mm


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the result dict also written to results/bench/retrieval.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50k-row index instead of 400k")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--batches", default="1,16,256", help="query batch sizes to time")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tmp", default=None, help="folder for the temporary index file")
    ap.add_argument("--out", default=str(REPO / "results" / "bench" / "retrieval.json"))
    args = ap.parse_args(argv)

    rows = args.rows or (50_000 if args.quick else 400_000)
    batches = [int(b) for b in args.batches.split(",")]
    device = resolve_device(args.device)
    chunk = args.chunk_size or default_chunk_size(args.dim)
    rng = np.random.default_rng(1)
    results: dict = {
        "benchmark": "retrieval_speed",
        "rows": rows,
        "dim": args.dim,
        "k": args.k,
        "index_dtype": "float16",
        "index_bytes": rows * args.dim * 2,
        "chunk_size": chunk,
        "device": str(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "quick": args.quick,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="retrieval_bench_") as tmp:
        path = Path(tmp) / "features.npy"
        t0 = time.perf_counter()
        _write_index(path, rows, args.dim, seed=0)
        results["write_s"] = round(time.perf_counter() - t0, 2)
        index = np.load(path, mmap_mode="r")
        print(f"index {rows} x {args.dim} float16 ({rows * args.dim * 2 / 1e9:.2f} GB) on {device}")

        # Correctness on a slice: chunked memmap search == one in-memory chunk.
        q = np.maximum(rng.standard_normal((8, args.dim), dtype=np.float32), 0)
        part = np.asarray(index[:20_000], dtype=np.float32)
        d_a, i_a = knn(q, index[:20_000], args.k, chunk_size=3000, device=device)
        d_b, i_b = knn(q, part, args.k, chunk_size=len(part), device=device)
        results["chunked_matches_unchunked"] = bool(
            np.array_equal(i_a, i_b) and np.allclose(d_a, d_b, rtol=1e-5)
        )

        # Warm the page cache once so every batch size reads the index from the same place.
        t0 = time.perf_counter()
        knn(q[:1], index, args.k, chunk_size=chunk, device=device)
        results["first_pass_s"] = round(time.perf_counter() - t0, 2)
        for b in batches:
            qb = np.maximum(rng.standard_normal((b, args.dim), dtype=np.float32), 0)
            t0 = time.perf_counter()
            knn(qb, index, args.k, chunk_size=chunk, query_batch=max(b, 1), device=device)
            dt = time.perf_counter() - t0
            run = {"query_batch": b, "seconds": round(dt, 3), "queries_per_s": round(b / dt, 3)}
            results["runs"].append(run)
            print(f"batch {b:5d}: {dt:8.2f} s  {b / dt:9.2f} queries/s")
    base = results["runs"][0]["queries_per_s"] if results["runs"] else None
    for run in results["runs"]:
        run["ratio_to_first"] = round(run["queries_per_s"] / base, 2) if base else None
    print("ratios to batch", batches[0], ":", [r["ratio_to_first"] for r in results["runs"]])
    print("chunked == unchunked:", results["chunked_matches_unchunked"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.part")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp_out, out)
    print("wrote", out)
    return results


if __name__ == "__main__":
    main()

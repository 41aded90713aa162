"""Synthetic archive speed: frames/s of ``synth.make_labelled`` at 512x512 with 1 and 2 workers.

Run: ``python benchmarks/synth_speed.py [--quick] [--n 240] [--size 512]``.
The 1- and 2-worker runs alternate over rounds (median per setting), so load from other
processes hits both alike. Each run renders and writes complete raw 16-bit PNG frames (the
whole ``make_labelled`` path: plan, render, PNG encode, atomic write, labels.parquet). Also
reports the CPU milliseconds per frame of rendering alone and of PNG writing alone, which do
not depend on how busy the machine is. Target: >= 30 frames/s at 512 px with 2 workers.
Writes ``results/bench/synth.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import synth  # noqa: E402
from pipeline.classes import CLASSES  # noqa: E402
from pipeline.imageio import write_frame  # noqa: E402
from pipeline.storage import atomic_path  # noqa: E402

TARGET_FPS = 30.0


def _cpu_ms(size: int, frames: int) -> tuple[float, float]:
    """CPU ms per frame of rendering, and of writing the PNG (process time, load-independent)."""
    for c in CLASSES:  # warm the geometry cache
        synth.render_frame(c, synth.frame_rng(0, 0), size)
    t = time.process_time()
    arrs = [synth.render_frame(CLASSES[i % 4], synth.frame_rng(1, i), size) for i in range(frames)]
    render = (time.process_time() - t) / frames * 1000
    with tempfile.TemporaryDirectory() as tmp:
        t = time.process_time()
        for i, a in enumerate(arrs):
            write_frame(Path(tmp) / f"{i}.png", a)
        write = (time.process_time() - t) / frames * 1000
    return render, write


def _run(n: int, size: int, workers: int) -> float:
    tmp = tempfile.mkdtemp(prefix="synth_bench_")
    try:
        t = time.perf_counter()
        synth.make_labelled(tmp, n=n, seed=0, size=size, workers=workers)
        return n / (time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (48 frames, 1 round)")
    ap.add_argument("--n", type=int, default=240, help="frames per run")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "synth.json")
    args = ap.parse_args(argv)
    n, rounds = (48, 1) if args.quick else (args.n, args.rounds)
    os.environ.setdefault("TQDM_DISABLE", "1")

    render_ms, write_ms = _cpu_ms(args.size, 24 if args.quick else 80)
    fps: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for w in (1, 2):
            fps[w].append(_run(n, args.size, w))
    med = {w: statistics.median(v) for w, v in fps.items()}
    result = {
        "size": args.size,
        "frames_per_run": n,
        "rounds": rounds,
        "fps_1_worker": round(med[1], 2),
        "fps_2_workers": round(med[2], 2),
        "speedup_2_vs_1": round(med[2] / med[1], 3),
        "cpu_ms_per_frame_render": round(render_ms, 2),
        "cpu_ms_per_frame_png_write": round(write_ms, 2),
        "cpu_bound_fps_per_core": round(1000.0 / (render_ms + write_ms), 1),
        "target_fps": TARGET_FPS,
        "meets_target": med[2] >= TARGET_FPS,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "quick": bool(args.quick),
    }
    print(
        f"synth {args.size}px: {med[1]:.1f} frames/s with 1 worker, {med[2]:.1f} frames/s with "
        f"2 workers (x{med[2] / med[1]:.2f}); CPU per frame: render {render_ms:.1f} ms + PNG "
        f"{write_ms:.1f} ms = {1000.0 / (render_ms + write_ms):.0f} frames/s per core; "
        f"target {TARGET_FPS:.0f} frames/s: {'met' if med[2] >= TARGET_FPS else 'NOT met'} "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

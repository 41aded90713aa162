"""How fast `scan` lists an archive: N tiny files in the YRS layout, side by side with a naive walk.

    python benchmarks/scan_speed.py            # 100,000 files
    python benchmarks/scan_speed.py --quick    # 10,000 files

Prints files/s, the seconds per 100k files, the speed-up over a naive pathlib + strptime walk,
the vectorised vs per-name timestamp parsing, and read_frame on a 512x512 16-bit PNG against
bare Pillow; writes results/bench/scan.json. Files hold a few bytes: scan never decodes pixels.
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
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.archive import parse_time, parse_times, scan  # noqa: E402
from pipeline.config import load_station  # noqa: E402
from pipeline.imageio import read_frame, write_frame  # noqa: E402


def make_tree(root: Path, n: int) -> list[str]:
    """N files named like YRS frames: 10 s cadence, 03-15 UT each day, one folder per day."""
    start = datetime(2004, 12, 1, 3, 0, 0, tzinfo=timezone.utc)
    per_day = 12 * 360
    names = []
    made: set[Path] = set()
    for i in range(n):
        t = start + timedelta(days=i // per_day, seconds=10 * (i % per_day))
        folder = root / f"{t:%Y}" / f"{t:%Y%m%d}"
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        name = f"N{t:%Y%m%d}G{t:%H%M%S}.png"
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n")
        names.append(name)
    calib = root / "calib"
    calib.mkdir()
    (calib / "dark_20041201.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return names


def naive_scan(root: Path, pattern: str) -> int:
    """What one writes first: rglob, strptime per name, stat per file."""
    rows = []
    for p in root.rglob("*"):
        if p.suffix.lower() != ".png" or "calib" in p.parts:
            continue
        try:
            t = datetime.strptime(p.stem, pattern).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
        st = p.stat()
        rows.append((str(p.relative_to(root)), t, st.st_size, st.st_mtime))
    return len(rows)


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="files to create (default 100000)")
    ap.add_argument("--quick", action="store_true", help="10000 files")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "scan.json")
    args = ap.parse_args()
    n = 10_000 if args.quick else args.n
    station = load_station("yrs")

    tmp = Path(tempfile.mkdtemp(prefix="aurora-scan-bench-"))
    try:
        t0 = time.perf_counter()
        names = make_tree(tmp / "archive", n)
        create_s = time.perf_counter() - t0
        print(f"created {n} files in {create_s:.1f} s under {tmp}")

        scan_s, (manifest, errors) = timed(lambda: scan(tmp / "archive", station), args.repeat)
        assert len(manifest) == n and len(errors) == 0, (len(manifest), len(errors))
        naive_s, naive_n = timed(lambda: naive_scan(tmp / "archive", station.filename_pattern), 1)
        assert naive_n == n

        vec_s, parsed = timed(lambda: parse_times(names, station.filename_pattern), args.repeat)
        loop_s, _ = timed(lambda: [parse_time(s, station.filename_pattern) for s in names], 1)
        assert not parsed.isna().any()

        # read_frame on the hot path: a 512x512 16-bit PNG with sky-like (compressible) content
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:512, :512]
        sky = 800 + 600 * np.exp(-((yy - 256) ** 2 + (xx - 256) ** 2) / 2e4)
        frame = rng.poisson(sky).astype(np.uint16)
        png = tmp / "N20041201G030000.png"
        write_frame(png, frame)
        from PIL import Image

        def bare() -> np.ndarray:
            with Image.open(png) as im:
                return np.asarray(im)

        reps = 50 if args.quick else 200
        read_runs = [timed(lambda: read_frame(png), reps // 10)[0] for _ in range(10)]
        bare_runs = [timed(bare, reps // 10)[0] for _ in range(10)]
        read_ms, bare_ms = statistics.median(read_runs) * 1e3, statistics.median(bare_runs) * 1e3
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "n_files": n,
        "create_s": round(create_s, 2),
        "scan_s": round(scan_s, 3),
        "scan_files_per_s": round(n / scan_s),
        "scan_s_per_100k": round(scan_s * 100_000 / n, 2),
        "naive_scan_s": round(naive_s, 3),
        "speedup_vs_naive": round(naive_s / scan_s, 2),
        "parse_times_vectorised_s": round(vec_s, 4),
        "parse_time_loop_s": round(loop_s, 4),
        "parse_speedup": round(loop_s / vec_s, 2),
        "read_frame_png16_512_ms": round(read_ms, 3),
        "bare_pillow_png16_512_ms": round(bare_ms, 3),
        "read_frame_overhead_ratio": round(read_ms / bare_ms, 2),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(
        f"scan: {n} files in {scan_s:.2f} s = {n / scan_s:,.0f} files/s "
        f"({scan_s * 100_000 / n:.1f} s per 100k); naive walk {naive_s:.2f} s "
        f"-> {naive_s / scan_s:.1f}x faster"
    )
    print(
        f"timestamps: vectorised {vec_s:.3f} s vs per-name loop {loop_s:.3f} s "
        f"({loop_s / vec_s:.1f}x)"
    )
    print(
        f"read_frame 512x512 16-bit PNG: {read_ms:.2f} ms vs bare Pillow {bare_ms:.2f} ms "
        f"({read_ms / bare_ms:.2f}x)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

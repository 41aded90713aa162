"""The frame store against the PNG frames it replaces, measured side by side in one run (issue 16).

    python benchmarks/store_throughput.py            # 512 frames of 512x512 16-bit PNG
    python benchmarks/store_throughput.py --quick    # 192 frames

The archive: ``--unique`` synthetic frames (pipeline.synth, YRS at 512 px, with calib/ darks)
hard-linked under 10-s-cadence names up to ``--frames`` (decoding costs per file; the page cache
holds them). Two models with random weights, each with its own store (``preprocess --format zarr
--input-size S``): the real-frame recipe's stn-lsoftmax-alexnet at 96 px (configs/train/real.yaml,
what a study retrains and ablates) and the paper's AlexNet at 227 px. The throughput does not
depend on the weights, and the store's frames are bit-identical to what the PNG path feeds the
model, so the predictions agree for any weights.

(a) read_vs_decode: CPU seconds per frame (process time: every thread zarr or blosc uses counts)
    of decode + preprocess (the PNG path's work before its resize, one thread) over reading the
    227-px store (the larger) in batches of 64; target >= 20 per core. Also against decode +
    preprocess + resize, and for the 96-px store.
(b) classify_store_vs_png: ``classify-archive STORE`` over ``classify-archive ARCHIVE``, end to
    end (planning included) on one warm cluster with the pipeline's CPU defaults, the same
    checkpoint, runs interleaved, the best of ``--repeats`` each; target >= 1.3, for the recipe's
    model (the key) and for the paper's (whose forward pass alone is twice the decode: at most
    ~1.45x on this CPU, results/bench/classify.json).
(c) max_prob_diff: the largest difference of a class probability between the two runs'
    predictions of the same frame, over both models; target <= 1e-5.
Also: the store writes (frames/s, bytes per frame). Writes results/bench/store.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline import framestore  # noqa: E402
from pipeline.archive import load_manifest  # noqa: E402
from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.classes import CLASSES, PROB_COLUMNS  # noqa: E402
from pipeline.classify import ShardSettings, classify_archive, decode_frame  # noqa: E402
from pipeline.cluster import dask_client, default_workers  # noqa: E402
from pipeline.config import load_station  # noqa: E402
from pipeline.models import build_model, resize_frames  # noqa: E402
from pipeline.predictions import read_predictions  # noqa: E402
from pipeline.preprocess_stage import run_preprocess  # noqa: E402
from pipeline.synth import make_archive  # noqa: E402

BATCH = 64
#: (name, variant, input size): the real-frame recipe's model and the paper's.
MODELS = (("recipe", "stn-lsoftmax-alexnet", 96), ("paper", "alexnet", 227))
TARGETS = {"read_vs_decode": 20.0, "classify_store_vs_png": 1.3, "max_prob_diff": 1e-5}


def make_bench_archive(root: Path, n: int, unique: int) -> Path:
    """``n`` frames at 10-s cadence, hard links to ``unique`` rendered synthetic frames."""
    base, arch = root / f"base-{unique}", root / f"archive-{n}-{unique}"
    if (arch / ".complete").exists():
        return arch
    shutil.rmtree(arch, ignore_errors=True)
    if not (base / ".complete").exists():
        shutil.rmtree(base, ignore_errors=True)
        t0 = time.perf_counter()
        make_archive(base, n=unique, seed=0, winters=(2004,), size=512, workers=2)
        (base / ".complete").touch()
        print(f"rendered {unique} unique 512x512 frames in {time.perf_counter() - t0:.0f} s")
    sources = sorted(p for p in base.rglob("N*.png") if "calib" not in p.parts)
    shutil.copytree(base / "calib", arch / "calib")
    start = pd.Timestamp("2004-12-01T03:00:00")
    for i in range(n):
        t = start + pd.Timedelta(seconds=10 * i)
        folder = arch / f"{t:%Y}" / f"{t:%Y%m%d}"
        folder.mkdir(parents=True, exist_ok=True)
        os.link(sources[i % len(sources)], folder / f"N{t:%Y%m%d}G{t:%H%M%S}.png")
    (arch / ".complete").touch()
    return arch


def cpu_per_frame(fn, n: int, repeats: int) -> tuple[float, float]:
    """(CPU s per frame, wall s per frame) of ``fn()`` over ``n`` frames, best of ``repeats``."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return min(cpu) / n, min(wall) / n


def measure_read_vs_decode(
    arch: Path, stores: dict[int, Path], manifest: pd.DataFrame, n_decode: int, repeats: int
) -> dict:
    """CPU time per frame of decode + preprocess (+ resize) and of reading each store."""
    torch.set_num_threads(1)
    station = load_station("yrs")
    settings = ShardSettings("", "", "", station, dark_dir=str(arch / "calib"))
    rows = manifest.iloc[:n_decode]
    args = list(zip(rows["abspath"], rows["frame"], rows["time_utc"]))
    big = max(stores)

    def decode():
        for p, f, t in args:
            decode_frame(p, int(f), t, settings)

    def decode_resize():
        for p, f, t in args:
            x = decode_frame(p, int(f), t, settings)
            resize_frames(torch.from_numpy(x)[None, None], big)

    dec_cpu, dec_wall = cpu_per_frame(decode, len(args), repeats)
    dr_cpu, _ = cpu_per_frame(decode_resize, len(args), repeats)
    res = {
        "decode_preprocess_ms_cpu": round(1e3 * dec_cpu, 3),
        "decode_preprocess_ms_wall": round(1e3 * dec_wall, 3),
        f"decode_preprocess_resize{big}_ms_cpu": round(1e3 * dr_cpu, 3),
        "frames_decoded": len(args),
    }
    for size, store in sorted(stores.items()):
        n_store = framestore.open_info(store).committed

        def read(store=store, n_store=n_store):
            for s in range(0, n_store, BATCH):
                framestore.read_frames(store, s, min(n_store, s + BATCH))

        read()  # open the array, warm the page cache
        rd_cpu, rd_wall = cpu_per_frame(read, n_store, repeats)
        res[f"store{size}_read_ms_cpu"] = round(1e3 * rd_cpu, 4)
        res[f"store{size}_read_ms_wall"] = round(1e3 * rd_wall, 4)
        res[f"read{size}_vs_decode"] = round(dec_cpu / rd_cpu, 2)
        res[f"read{size}_vs_decode_wall"] = round(dec_wall / rd_wall, 2)
    res["read_vs_decode"] = res[f"read{big}_vs_decode"]
    res["read_vs_decode_resize"] = round(dr_cpu / (1e-3 * res[f"store{big}_read_ms_cpu"]), 2)
    return res


def classify_side_by_side(
    client, arch: Path, store: Path, ckpt: Path, work: Path, repeats: int, tag: str
) -> tuple[dict, float]:
    """Interleaved end-to-end runs of both sources on a warm cluster; the best of each."""
    times: dict[str, list[float]] = {"png": [], "store": []}
    preds: dict[str, pd.DataFrame] = {}
    kw = {"device": "cpu", "batch_size": BATCH, "client": client}
    last = load_manifest(arch, load_station("yrs"))["time_utc"].sort_values().iloc[-BATCH - 1]
    for name, src in (("png", arch), ("store", store)):  # model loaded, caches warm
        classify_archive(src, ckpt, work / f"warm-{tag}-{name}", since=last, **kw)
    for k in range(repeats):
        for name, src in (("png", arch), ("store", store)):
            out = work / f"pred-{tag}-{name}-{k}"
            t0 = time.perf_counter()
            s = classify_archive(src, ckpt, out, **kw)
            times[name].append(time.perf_counter() - t0)
            assert s.frames_errors == 0, s.text()
            preds[name] = read_predictions(out).sort_values(["path", "frame"], ignore_index=True)
            fps = s.frames_classified / times[name][-1]
            print(f"  {tag} {name:<5} run {k + 1}: {fps:6.1f} frames/s")
    a, b = preds["png"], preds["store"]
    assert a["path"].tolist() == b["path"].tolist()
    probs = list(PROB_COLUMNS)
    diff = float(np.abs(a[probs].to_numpy() - b[probs].to_numpy()).max())
    n = len(a)
    res = {
        "frames": n,
        "png_wall_s": [round(t, 2) for t in times["png"]],
        "store_wall_s": [round(t, 2) for t in times["store"]],
        "png_frames_per_s": round(n / min(times["png"]), 2),
        "store_frames_per_s": round(n / min(times["store"]), 2),
        "classify_store_vs_png": round(min(times["png"]) / min(times["store"]), 3),
        "max_prob_diff": diff,
        "labels_equal": bool((a["label"] == b["label"]).all()),
    }
    return res, diff


def write_store(arch: Path, store: Path, size: int, n: int) -> dict:
    """``preprocess --format zarr`` of the archive at ``size``: throughput and bytes per frame."""
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    s = run_preprocess(arch, store, fmt="zarr", input_size=size)
    t_write = time.perf_counter() - t0
    assert s.written == n, s.line()
    nbytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    res = {
        "seconds_with_cluster_start": round(t_write, 2),
        "frames_per_s": round(n / t_write, 2),
        "bytes_per_frame": round(nbytes / n),
        "compression": round(n * size * size * 4 / nbytes, 2),
    }
    print(f"store {size} px written: {res['frames_per_s']:.1f} frames/s (cluster start "
          f"included), {res['bytes_per_frame'] / 1e3:.0f} kB/frame "
          f"({res['compression']:.2f}x)")  # fmt: skip
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="192 frames instead of 512")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--unique", type=int, default=64, help="distinct rendered frames")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="work folder (kept: reuse archive)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "store.json")
    args = ap.parse_args(argv)
    n = args.frames or (192 if args.quick else 512)
    work = args.work or Path(tempfile.mkdtemp(prefix="aurora-bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t_all = time.perf_counter()

    arch = make_bench_archive(work, n, args.unique)
    manifest = load_manifest(arch, load_station("yrs"))
    print(f"{n} frames ({args.unique} unique), {os.cpu_count()} cpus, load {load0[0]:.1f}")
    stores, writes, ckpts = {}, {}, {}
    for tag, variant, size in MODELS:
        ckpts[tag] = work / f"ckpt-{tag}"
        if not (ckpts[tag] / "meta.json").exists():
            torch.manual_seed(0)
            model = build_model(variant, input_size=size)
            save_checkpoint(ckpts[tag], model, {"classes": list(CLASSES)})
        stores[size] = work / f"store-{n}-{size}.zarr"
        writes[size] = write_store(arch, stores[size], size, n)

    rvd = measure_read_vs_decode(arch, stores, manifest, min(n, 64 if args.quick else 128), 3)
    big = max(stores)
    print(f"(a) decode+preprocess {rvd['decode_preprocess_ms_cpu']:.2f} ms CPU/frame, "
          f"{big}-px store read {rvd[f'store{big}_read_ms_cpu']:.3f} ms CPU/frame: "
          f"{rvd['read_vs_decode']:.1f}x per core ({rvd['read_vs_decode_resize']:.1f}x against "
          f"decode+preprocess+resize)")  # fmt: skip
    runs, diffs = {}, []
    with dask_client(default_workers(), 1) as client:
        for tag, variant, size in MODELS:
            runs[tag], d = classify_side_by_side(
                client, arch, stores[size], ckpts[tag], work, args.repeats, tag
            )
            runs[tag].update(model=f"{variant} {size}px random weights", workers=default_workers())
            diffs.append(d)
            print(f"(b) {tag} ({variant} {size} px): classify-archive STORE "
                  f"{runs[tag]['store_frames_per_s']:.1f} frames/s vs ARCHIVE "
                  f"{runs[tag]['png_frames_per_s']:.1f}: "
                  f"{runs[tag]['classify_store_vs_png']:.2f}x")  # fmt: skip
    diff = max(diffs)
    print(f"(c) max |p_store - p_png| = {diff:.3g}")

    key = runs[MODELS[0][0]]["classify_store_vs_png"]
    result = {
        "benchmark": "store_throughput",
        "frames": n,
        "unique_frames": args.unique,
        "frame": "512x512 uint16 PNG (synthetic YRS), dark-subtracted, cropped to 440",
        "store": f"float32 at the input size, chunks of {framestore.FRAMES_PER_CHUNK}, "
        "blosc lz4 shuffle",
        "read_vs_decode": rvd["read_vs_decode"],
        "classify_store_vs_png": key,
        "classify_store_vs_png_by_model": {t: r["classify_store_vs_png"] for t, r in runs.items()},
        "max_prob_diff": diff,
        "targets": TARGETS,
        "meets": {
            "read_vs_decode": rvd["read_vs_decode"] >= TARGETS["read_vs_decode"],
            "classify_store_vs_png": key >= TARGETS["classify_store_vs_png"],
            "max_prob_diff": diff <= TARGETS["max_prob_diff"],
        },
        "read": rvd,
        "classify": runs,
        "write": {str(k): v for k, v in writes.items()},
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "total_s": round(time.perf_counter() - t_all, 1),
        "quick": bool(args.quick),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()

"""Training images/s and inference ms/image of every variant, beside bare torchvision AlexNet.

Run: ``python benchmarks/model_speed.py [--quick] [--device cpu|cuda] [--size 227]``.
Measurements are interleaved (one timed run of each model per round) and the best round is kept
(timeit's rule: the least disturbed run estimates the cost), so load from other processes hits
all models alike and the printed ratios stay meaningful even when absolute times drift; the
median is recorded too.  The STN's overhead over AlexNet is compared with the paper's 22 %
(12.43 vs 10.16 ms/image).  Writes ``results/bench/models.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.models import VARIANTS, build_model  # noqa: E402
from pipeline.storage import atomic_path  # noqa: E402

BARE = "torchvision-alexnet"
PAPER_STN_OVERHEAD = 12.43 / 10.16 - 1.0


class _Bare(torch.nn.Module):
    """Stock torchvision AlexNet (3-channel input, 4 outputs): the reference for the ratios."""

    in_chans = 3

    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.alexnet(weights=None, num_classes=4)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _models(names: list[str], size: int, device: torch.device) -> dict[str, torch.nn.Module]:
    out: dict[str, torch.nn.Module] = {BARE: _Bare().to(device)}
    for name in names:
        torch.manual_seed(0)
        out[name] = build_model(name, input_size=size).to(device)
    return out


def _input(model: torch.nn.Module, batch: int, size: int, device: torch.device) -> torch.Tensor:
    chans = getattr(model, "in_chans", 1)
    return torch.randn(batch, chans, size, size, device=device)


def _time_infer(model, x, device) -> float:
    model.eval()
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(x)
    _sync(device)
    return time.perf_counter() - t0


def _time_train(model, opt, x, y, device) -> float:
    model.train()
    _sync(device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x, y), y)
    loss.backward()
    opt.step()
    lsoftmax = getattr(model, "lsoftmax", None)
    if lsoftmax is not None:
        lsoftmax.step()
    _sync(device)
    return time.perf_counter() - t0


def _interleaved(models, fn, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of fn(name, model) for each round, one call per model per round."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(warmup + rounds):
        for name, model in models.items():
            dt = fn(name, model)
            if r >= warmup:
                times[name].append(dt)
    return times


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small batches, few rounds")
    ap.add_argument("--size", type=int, default=227)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=str(REPO / "results" / "bench" / "models.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "inception-v4" in names and importlib.util.find_spec("timm") is None:
        print(
            "skipping inception-v4: timm not installed (pip install 'aurora-pipeline[baselines]')"
        )
        names.remove("inception-v4")
    gpu = device.type == "cuda"
    infer_batch = (16 if args.quick else 64) if gpu else (8 if args.quick else 16)
    train_batch = (16 if args.quick else 64) if gpu else (4 if args.quick else 16)
    rounds, warmup = (3, 1) if args.quick else (10, 2)
    size = args.size

    models = _models(names, size, device)
    x1 = {n: _input(m, 1, size, device) for n, m in models.items()}
    xb = {n: _input(m, infer_batch, size, device) for n, m in models.items()}
    xt = {n: _input(m, train_batch, size, device) for n, m in models.items()}
    yt = torch.arange(train_batch, device=device) % 4
    opts = {n: torch.optim.SGD(m.parameters(), lr=1e-5, momentum=0.9) for n, m in models.items()}

    b1 = _interleaved(models, lambda n, m: _time_infer(m, x1[n], device), rounds, warmup)
    bn = _interleaved(models, lambda n, m: _time_infer(m, xb[n], device), rounds, warmup)
    tr = _interleaved(models, lambda n, m: _time_train(m, opts[n], xt[n], yt, device), rounds, 1)

    results = {}
    for n, m in models.items():
        results[n] = {
            "params": sum(p.numel() for p in m.parameters()),
            "infer_ms_per_image_batch1": 1000 * min(b1[n]),
            f"infer_ms_per_image_batch{infer_batch}": 1000 * min(bn[n]) / infer_batch,
            "train_images_per_s": train_batch / min(tr[n]),
            "median": {
                "infer_ms_per_image_batch1": 1000 * statistics.median(b1[n]),
                f"infer_ms_per_image_batch{infer_batch}": 1000
                * statistics.median(bn[n])
                / infer_batch,
                "train_images_per_s": train_batch / statistics.median(tr[n]),
            },
        }
    ref = results[BARE]
    ratios = {
        n: {
            "infer_batch1_vs_bare": r["infer_ms_per_image_batch1"]
            / ref["infer_ms_per_image_batch1"],
            "train_vs_bare": ref["train_images_per_s"] / r["train_images_per_s"],
        }
        for n, r in results.items()
    }
    stn = {}
    if "stn-alexnet" in results and "alexnet" in results:
        a, s = results["alexnet"], results["stn-alexnet"]
        key = f"infer_ms_per_image_batch{infer_batch}"
        stn = {
            "batch1": s["infer_ms_per_image_batch1"] / a["infer_ms_per_image_batch1"] - 1.0,
            f"batch{infer_batch}": s[key] / a[key] - 1.0,
            "train": a["train_images_per_s"] / s["train_images_per_s"] - 1.0,
            "paper": PAPER_STN_OVERHEAD,
        }

    print(
        f"device {device} ({platform.processor() or platform.machine()}), {size} px, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"infer batch {infer_batch}, train batch {train_batch}, best of {rounds}"
    )
    head = f"{'model':<22}{'ms/img b1':>11}{f'ms/img b{infer_batch}':>12}{'train img/s':>13}"
    print(head + f"{'b1 vs bare':>12}{'train vs bare':>15}")
    for n, r in results.items():
        print(
            f"{n:<22}{r['infer_ms_per_image_batch1']:>11.2f}"
            f"{r[f'infer_ms_per_image_batch{infer_batch}']:>12.2f}"
            f"{r['train_images_per_s']:>13.1f}"
            f"{ratios[n]['infer_batch1_vs_bare']:>12.2f}{ratios[n]['train_vs_bare']:>15.2f}"
        )
    if stn:
        print(
            "STN overhead over AlexNet: "
            + ", ".join(f"{k} {100 * v:+.1f}%" for k, v in stn.items() if k != "paper")
            + f" (paper {100 * PAPER_STN_OVERHEAD:+.1f}%, target below it)"
        )
    report = {
        "benchmark": "model_speed",
        "quick": args.quick,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if gpu else platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "input_size": size,
        "infer_batch": infer_batch,
        "train_batch": train_batch,
        "rounds": rounds,
        "results": results,
        "ratios_vs_torchvision_alexnet": ratios,
        "stn_overhead": stn,
    }
    out = Path(args.out)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

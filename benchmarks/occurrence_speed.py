"""Occurrence speed: 10M synthetic predictions binned by MLT (pandas in memory, and the whole
stage on a sharded predictions directory through dask), plus aacgm MLT for 1M timestamps.

    python benchmarks/occurrence_speed.py            # 10M predictions (target < 15 s)
    python benchmarks/occurrence_speed.py --quick    # 1M

Writes results/bench/occurrence.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.classes import CLASSES
from pipeline.config import load_station
from pipeline.mlt import ut_to_mlt
from pipeline.occurrence import add_mlt, occurrence_table
from pipeline.occurrence_stage import run_occurrence

REPO = Path(__file__).resolve().parents[1]


def synthetic(n: int, seed: int = 0) -> pd.DataFrame:
    """n predictions over six winters at 10 s cadence, 03-15 UT, random classes."""
    rng = np.random.default_rng(seed)
    day0 = pd.Timestamp("2004-11-01", tz="UTC").value
    days = rng.integers(0, 6 * 365, n, dtype=np.int64)
    sec = rng.integers(3 * 3600, 15 * 3600, n, dtype=np.int64) // 10 * 10
    t = pd.to_datetime(day0 + (days * 86400 + sec) * 1_000_000_000, utc=True)
    labels = pd.Categorical.from_codes(rng.integers(0, 4, n), categories=list(CLASSES))
    return pd.DataFrame({"time_utc": t, "label": labels})


def write_shards(df: pd.DataFrame, out: Path, shard_rows: int) -> int:
    """The predictions contract's time_utc and label columns as shard-*.parquet files."""
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("time_utc", pa.timestamp("ns", tz="UTC")),
            ("label", pa.dictionary(pa.int8(), pa.string())),
        ]
    )
    k = 0
    for k, start in enumerate(range(0, len(df), shard_rows)):
        part = df.iloc[start : start + shard_rows]
        pq.write_table(
            pa.Table.from_pandas(part, schema=schema, preserve_index=False),
            out / f"shard-{k:06d}.parquet",
        )
    return k + 1


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1M predictions instead of 10M")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "occurrence.json")
    args = ap.parse_args()
    n = args.n or (1_000_000 if args.quick else 10_000_000)
    station = load_station("yrs")
    df = synthetic(n)

    t_mlt, frames = timed(lambda: add_mlt(df, station, "offset"))
    t_bin, table = timed(lambda: occurrence_table(frames, bins="3min", ci=True))
    assert table["n_frames"].sum() + table.attrs["n_dropped"] == n
    pandas_s = t_mlt + t_bin

    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(df, Path(tmp) / "predictions", shard_rows=500_000)
        stage_s, info = timed(
            lambda: run_occurrence(
                Path(tmp) / "predictions", Path(tmp) / "occ", bins="3min", ci=True
            )
        )
    assert info["n_binned"] == table.attrs["n_binned"]

    n_aacgm = min(n, 1_000_000)
    times = df["time_utc"].iloc[:n_aacgm]
    aacgm_s, _ = timed(lambda: ut_to_mlt(times, station, "aacgm"))
    offset_s, _ = timed(lambda: ut_to_mlt(times, station, "offset"))

    result = {
        "n_predictions": n,
        "pandas_in_memory_s": round(pandas_s, 3),
        "pandas_mlt_offset_s": round(t_mlt, 3),
        "pandas_binning_s": round(t_bin, 3),
        "stage_dask_s": round(stage_s, 3),
        "stage_shards": shards,
        "predictions_per_s_stage": round(n / stage_s),
        "target_s": 15.0,
        "aacgm_timestamps": n_aacgm,
        "aacgm_s": round(aacgm_s, 3),
        "offset_s_same_timestamps": round(offset_s, 3),
        "aacgm_over_offset": round(aacgm_s / offset_s, 1),
        "stage_over_pandas": round(stage_s / pandas_s, 2),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "note": "stage = read shards + MLT + counts + table + parquet/NetCDF/PNG/PDF; shared CPU",
    }
    print(
        f"{n:,} predictions: pandas in memory {pandas_s:.2f} s "
        f"(MLT {t_mlt:.2f} + bins {t_bin:.2f}); "
        f"whole stage on {shards} shards {stage_s:.2f} s (x{stage_s / pandas_s:.2f} of pandas; "
        f"target < 15 s)\n"
        f"{n_aacgm:,} timestamps: aacgm {aacgm_s:.2f} s vs offset {offset_s:.3f} s "
        f"(x{aacgm_s / offset_s:.0f})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

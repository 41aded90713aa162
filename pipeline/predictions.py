"""The predictions folder classify-archive writes and other stages read.

See docs/design.md, "Predictions".

A predictions folder (PRED_DIR) is a Parquet dataset: ``PRED_DIR/shards`` holds nothing but the
shards, so any client (pandas, pyarrow, Dask, DuckDB, polars) opens it as the predictions table,
and everything else in PRED_DIR starts with ``_`` or ``.``, so pandas and pyarrow open PRED_DIR
too:

- ``shards/shard-NNNNNN.parquet``: predictions (PREDICTIONS_SCHEMA), one row per classified
  frame, in manifest order.
- ``_features/shard-NNNNNN.npy`` (``--features``): FC7 features, float16, shape (rows, 4096), in
  the row order of the shard's parquet file (written before it, so a shard's parquet file implies
  its features).
- ``_errors.parquet``: frames that could not be classified (stage ``classify``), one row per frame
  with the reason; ``ShardFailed`` rows are frames of a shard that kept failing.
- ``_run.json``, the run record (:data:`pipeline.output_folder.RUN_RECORD`): command
  ``classify-archive``, model_id, checkpoint, station, archive root, manifest hash, shard size,
  ``shards`` (the done shards with their counts), ``runs`` (one entry per run) and ``finished``.

A shard is done when its parquet file exists and ``_run.json`` lists it: a run that was killed
may leave a shard file it did not record (a stray), which readers ignore and the next run removes.
A folder of shard files without ``_run.json`` (``shards/`` itself, or shards made elsewhere)
counts every shard file.

This module only names and reads the folder (it never imports the classifier), so the stages that
consume predictions depend on the format, not on the inference code.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.output_folder import RUN_RECORD, read_run_record
from pipeline.storage import PREDICTIONS_SCHEMA, empty_frame
from pipeline.storage import read_errors as read_errors_table

log = logging.getLogger(__name__)

#: The command whose run record a predictions folder holds.
COMMAND = "classify-archive"
#: The ``stage`` of classify-archive's rows in ``_errors.parquet``.
STAGE = "classify"
#: The run record of a predictions folder.
RUN_FILE = RUN_RECORD
#: The predictions dataset: a folder of shard files and nothing else.
SHARDS_DIR = "shards"
#: Not predictions: hidden from Parquet readers by the leading underscore.
ERRORS_FILE = "_errors.parquet"
FEATURES_DIR = "_features"
#: error class of rows written for a whole shard that failed after its retries (retried by reruns).
SHARD_FAILED = "ShardFailed"
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.parquet$")


def shard_name(shard: int) -> str:
    """File name of a shard's predictions: ``shard-000123.parquet``."""
    return f"shard-{shard:06d}.parquet"


def features_name(shard: int) -> str:
    """File name of a shard's FC7 features inside ``_features/``: ``shard-000123.npy``."""
    return f"shard-{shard:06d}.npy"


def shard_path(out: str | os.PathLike, shard: int) -> Path:
    """Where a shard's predictions are written: ``OUT/shards/shard-000123.parquet``."""
    return Path(out) / SHARDS_DIR / shard_name(shard)


def features_path(out: str | os.PathLike, shard: int) -> Path:
    """A shard's features file: ``OUT/_features/shard-000123.npy``."""
    return Path(out) / FEATURES_DIR / features_name(shard)


def errors_path(out: str | os.PathLike) -> Path:
    """The errors table of a predictions folder: ``OUT/_errors.parquet``."""
    return Path(out) / ERRORS_FILE


# ------------------------------------------------------------------------------ the run record


def read_run(out: str | os.PathLike) -> dict[str, Any] | None:
    """The ``_run.json`` of a predictions folder, or None when there is none."""
    return read_run_record(out, strict=True)


def done_shards(run: dict[str, Any] | None) -> set[int]:
    """The shard numbers a run record vouches for."""
    return {int(k) for k in (run or {}).get("shards", {})}


def shard_files(out: str | os.PathLike) -> dict[int, Path]:
    """Shard number -> predictions file, in shard order, of a predictions folder (``shards/``)
    or of a folder of shard files (such as ``shards/`` itself); strays included."""
    found = {}
    for folder in (Path(out), Path(out) / SHARDS_DIR):  # shards/ wins a number
        for p in folder.glob("shard-*.parquet"):
            m = _SHARD_RE.match(p.name)
            if m:
                found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def done_shard_files(out: str | os.PathLike) -> list[Path]:
    """The shard files ``_run.json`` vouches for, in shard order (a killed run's strays are not).

    A folder of shard files without ``_run.json`` (made elsewhere) counts all of them.
    """
    run = read_run(out)
    files = shard_files(out)
    if run is None:
        return list(files.values())
    done = done_shards(run)
    return [p for s, p in files.items() if s in done]


def read_predictions(out: str | os.PathLike, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """All predictions of a folder (the union of its done shards), in shard order."""
    files = done_shard_files(out)
    cols = list(columns) if columns else None
    if not files:
        df = empty_frame(PREDICTIONS_SCHEMA)
        return df[cols] if cols else df
    tables = [pq.read_table(f, columns=cols, schema=PREDICTIONS_SCHEMA) for f in files]
    return pa.concat_tables(tables).to_pandas()


def read_errors(out: str | os.PathLike) -> pd.DataFrame:
    """The errors table of a predictions folder (empty when there is none)."""
    return read_errors_table(errors_path(out))


def unclassified_frames(pred: str | os.PathLike) -> tuple[int, int, str | None]:
    """Frames that classify-archive's last run into ``pred`` was to classify but that are neither
    in a done shard nor in _errors.parquet: (missing, frames the run considered, its --since).

    (0, 0, None) when the last run finished or when _run.json does not say. Cheap for any
    archive: it adds up the per-shard counts _run.json records, less the frames of the run's
    failed shards (``frames_failed``: they are in _errors.parquet).
    """
    none = (0, 0, None)
    run = read_run(pred) if Path(pred).is_dir() else None
    runs = (run or {}).get("runs")
    if not isinstance(runs, list) or not runs or not isinstance(runs[-1], dict):
        return none
    last = runs[-1]
    if last.get("finished"):
        return none  # a finished run put every frame it planned into a shard or into errors
    try:
        planned_frames = int(last["frames_planned"])
        planned = {int(s) for s in last.get("shards_planned", [])}
        considered = int(last.get("frames_considered", planned_frames))
        failed = int(last.get("frames_failed", 0))
        done = sum(
            int(e["frames"]) for k, e in (run.get("shards") or {}).items() if int(k) in planned
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return none  # a _run.json of another layout: nothing to go by
    return max(planned_frames - done - failed, 0), considered, last.get("since")


# ------------------------------------------------------------------------------ writers' leftovers


def remove_strays(out: str | os.PathLike, done: set[int]) -> None:
    """Remove temporary files of killed writers and shard files (with their features) that
    ``_run.json`` does not vouch for (``done``)."""
    out = Path(out)
    for folder in (out, out / SHARDS_DIR, out / FEATURES_DIR):
        for p in folder.glob(".shard-*.part"):
            p.unlink(missing_ok=True)
    for s, p in shard_files(out).items():
        if s not in done:
            log.info("removing %s: written by an interrupted run, not marked done", p.name)
            p.unlink(missing_ok=True)
            features_path(out, s).unlink(missing_ok=True)

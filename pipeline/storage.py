"""Tables on disk: explicit Arrow schemas, atomic writes, the errors table.

A write goes to a temporary name, then is renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.classes import CLASSES, PROB_COLUMNS
from pipeline.errors import InputError

_TS = pa.timestamp("ns", tz="UTC")

#: manifest.parquet (docs/design.md section 4): one row per frame, sorted by time.
MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("frame", pa.int16()),
        ("time_utc", _TS),
        ("station", pa.string()),
        ("bytes", pa.int64()),
        ("mtime", _TS),
    ]
)

#: errors.parquet: every frame that a stage could not handle, with the reason.
ERRORS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("frame", pa.int16()),
        ("stage", pa.string()),
        ("error", pa.string()),
        ("message", pa.string()),
    ]
)

#: predictions/shards/shard-NNNNNN.parquet.
PREDICTIONS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("frame", pa.int16()),
        ("time_utc", _TS),
        ("mlt", pa.float64()),
        ("label", pa.dictionary(pa.int8(), pa.string())),
        *[(c, pa.float32()) for c in PROB_COLUMNS],
        ("sky_level", pa.float32()),
        ("model_id", pa.string()),
    ]
)

#: Units (None: none apply) and meaning of each predictions column, carried in every shard.
PREDICTIONS_COLUMNS: dict[str, tuple[str | None, str]] = {
    "path": (None, "frame file, relative to the archive root"),
    "frame": (None, "frame index within its file (0 for single-frame files)"),
    "time_utc": (None, "frame time (UTC)"),
    "mlt": ("hours", "magnetic local time of the station at time_utc, in [0, 24)"),
    "label": (None, "most probable class (see aurora:classes)"),
    **{f"p_{c}": ("1", f"softmax probability of class {c}") for c in CLASSES},
    "sky_level": (
        "1",
        "mean brightness of the frame as the model sees it, 0 (black) to 1 "
        "(pipeline.models.sky_level); null where classified before it was recorded",
    ),
    "model_id": (None, "id of the checkpoint that classified the frame"),
}

assert len(PROB_COLUMNS) == len(CLASSES)
assert list(PREDICTIONS_COLUMNS) == PREDICTIONS_SCHEMA.names

#: Version of the data contract the key-value metadata below describes (README "Data contract").
CONTRACT_VERSION = "1"
#: Prefix of the pipeline's keys in Parquet key-value metadata, like Arrow's "ARROW:schema".
META_PREFIX = "aurora:"


def contract_metadata(
    table: str, columns: Mapping[str, Mapping[str, str]], **facts: object
) -> dict[str, str]:
    """Parquet key-value metadata of a table: what it is, its classes, each column's units and
    meaning (``columns``: name -> {units, long_name}), and ``facts`` (station, model_id,
    mlt_method, ...; None is left out). Values that are not strings are JSON."""
    meta: dict[str, object] = {
        "table": table,
        "contract": CONTRACT_VERSION,
        "classes": list(CLASSES),
        "units": {c: d["units"] for c, d in columns.items() if d.get("units") is not None},
        "long_names": {c: d["long_name"] for c, d in columns.items()},
        **{k: v for k, v in facts.items() if v is not None},
    }
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def column_docs(columns: Mapping[str, tuple[str | None, str]]) -> dict[str, dict[str, str]]:
    """{name: {units, long_name}} of a table's (units, meaning) pairs (units left out if None)."""
    return {
        name: {"long_name": text} | ({"units": units} if units is not None else {})
        for name, (units, text) in columns.items()
    }


def predictions_metadata(station: str, model_id: str, mlt_method: str) -> dict[str, str]:
    """The key-value metadata every predictions shard carries."""
    return contract_metadata(
        "predictions",
        column_docs(PREDICTIONS_COLUMNS),
        station=station,
        model_id=model_id,
        mlt_method=mlt_method,
    )


def read_contract(path: str | os.PathLike) -> dict[str, object]:
    """The pipeline's key-value metadata of a Parquet file, prefix dropped, lists, mappings and
    booleans decoded (strings such as a station code stay strings)."""
    meta = pq.read_schema(path).metadata or {}
    found: dict[str, object] = {}
    for key, raw in meta.items():
        name, text = key.decode(), raw.decode()
        if name.startswith(META_PREFIX):
            is_json = text.startswith(("[", "{")) or text in ("true", "false")
            found[name[len(META_PREFIX) :]] = json.loads(text) if is_json else text
    return found


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``, renamed onto ``path`` only if the block succeeds."""
    final = Path(path)
    if final.is_dir():
        raise InputError(f"{final}: is a folder; give the name of a file to write")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; outputs get the usual permissions (umask applied).
        umask = os.umask(0)
        os.umask(umask)
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on ``path`` for the block, or raise InputError.

    flock locks vanish with the process that held them, so a crashed run never leaves a stale
    lock. Nothing is written into the file: its mtime must not change, since workflows compare
    the mtimes of the folders that hold it.
    """
    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{what} (lock {lock}); wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_table(
    df: pd.DataFrame,
    path: str | os.PathLike,
    schema: pa.Schema | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a DataFrame as Parquet atomically, cast to ``schema`` when given, with the
    key-value ``metadata`` (e.g. :func:`contract_metadata`) beside pandas' own."""
    if schema is not None:
        df = df.reindex(columns=schema.names)
        table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    else:
        table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    """An empty DataFrame with the columns and dtypes of ``schema``."""
    return schema.empty_table().to_pandas()


def error_rows(
    items: Sequence[tuple[str, int]], stage: str, exc: BaseException | str, error: str | None = None
) -> pd.DataFrame:
    """Rows of the errors table for ``items`` ((path, frame) pairs) that failed with ``exc``."""
    name = error or (type(exc).__name__ if isinstance(exc, BaseException) else "Error")
    msg = str(exc)
    return pd.DataFrame(
        {
            "path": [str(p) for p, _ in items],
            "frame": [int(f) for _, f in items],
            "stage": stage,
            "error": name,
            "message": msg,
        },
        columns=ERRORS_SCHEMA.names,
    )


def read_errors(path: str | os.PathLike) -> pd.DataFrame:
    """An errors table (empty when the file is absent); an unreadable one is an InputError."""
    p = Path(path)
    if not p.exists():
        return empty_frame(ERRORS_SCHEMA)
    try:
        df = pd.read_parquet(p)
    except Exception as exc:  # noqa: BLE001 - any decode failure is a damaged file
        raise InputError(f"{p}: unreadable errors table ({exc}); move it away and rerun") from None
    if "frame" not in df.columns:
        df["frame"] = 0
    return df


def merge_errors(
    path: str | os.PathLike, new: pd.DataFrame, stage: str | None = None
) -> pd.DataFrame:
    """Merge new error rows into errors.parquet (one row per path, frame and stage; newest wins)."""
    p = Path(path)
    old = read_errors(p)
    both = pd.concat([old, new], ignore_index=True) if len(new) else old
    both = both.drop_duplicates(subset=["path", "frame", "stage"], keep="last")
    write_table(both, p, ERRORS_SCHEMA)
    return both


def replace_stage_errors(
    path: Path, rows: pd.DataFrame, stage: str, keep_empty: bool = False
) -> pd.DataFrame:
    """This stage's rows replace its earlier ones in errors.parquet; other stages' rows stay.

    The file is left alone when this stage's rows are unchanged (workflows read its mtime); an
    empty result removes it unless ``keep_empty``. Returns the table as it now is.
    """
    old = read_errors(path)
    rows = rows.assign(stage=stage) if len(rows) else rows
    mine = old[old["stage"] == stage] if len(old) else old
    key = ["path", "frame", "error", "message"]
    if path.exists() and _rows(mine, key) == _rows(rows, key):
        return old
    rest = old[old["stage"] != stage] if len(old) else old
    both = pd.concat([x for x in (rest, rows) if len(x)] or [empty_frame(ERRORS_SCHEMA)])
    both = both.reset_index(drop=True)
    if len(both) or keep_empty:
        write_table(both, path, ERRORS_SCHEMA)
    else:
        path.unlink(missing_ok=True)  # only a stale table of an earlier run was there
    return both


def _rows(df: pd.DataFrame, columns: list[str]) -> list[list[str]]:
    return df[columns].astype(str).values.tolist() if len(df) else []

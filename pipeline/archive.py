"""Finding frames in an archive: timestamps from file names or PGM headers, and the manifest.

The scan never decodes pixels: it lists files (``os.scandir``), parses times from names with
the station's strftime pattern (or reads the per-frame headers of PGM stacks) and stats each
file. A corrupt frame is therefore still in the manifest; the stage that reads it reports it.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.config import StationConfig
from pipeline.cores import usable_cores
from pipeline.errors import ConfigError, FrameReadError, InputError
from pipeline.imageio import PGM_SUFFIXES, pgm_times
from pipeline.output_folder import COMMAND_OUTPUTS, RUN_RECORD, read_run_record
from pipeline.storage import (
    ERRORS_SCHEMA,
    MANIFEST_SCHEMA,
    atomic_path,
    empty_frame,
    read_errors,
    replace_stage_errors,
)

log = logging.getLogger(__name__)

#: Parquet key-value metadata key holding the archive root of a manifest.
ROOT_KEY = b"aurora.root"
#: Default globs (relative to the archive root) that scans skip: calibration frames.
DEFAULT_EXCLUDE = ("calib/*", "*/calib/*")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
_LIST_SUFFIXES = (".csv", ".parquet")
#: Files that make a folder a checkpoint: no manifest is written into one.
CHECKPOINT_FILES = ("model.safetensors", "last.pt")

# ----------------------------------------------------------------------------- time from names

_DIRECTIVES = {
    "Y": r"(?P<Y>\d{4})",
    "y": r"(?P<y>\d{2})",
    "m": r"(?P<m>\d{2})",
    "d": r"(?P<d>\d{2})",
    "j": r"(?P<j>\d{3})",
    "H": r"(?P<H>\d{2})",
    "M": r"(?P<M>\d{2})",
    "S": r"(?P<S>\d{2})",
    "f": r"(?P<f>\d{1,6})",
}


@functools.lru_cache(maxsize=64)
def _regex_body(pattern: str) -> str:
    """A strftime pattern as a regex, one named group per directive (Python re and RE2 syntax)."""
    parts: list[str] = []
    seen: set[str] = set()
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "%" and i + 1 < len(pattern):
            d = pattern[i + 1]
            if d == "%":
                parts.append("%")
            elif d in _DIRECTIVES:
                if d in seen:
                    raise ConfigError(f"filename pattern {pattern!r}: %{d} appears twice")
                seen.add(d)
                parts.append(_DIRECTIVES[d])
            else:
                allowed = " ".join(f"%{k}" for k in _DIRECTIVES)
                raise ConfigError(
                    f"filename pattern {pattern!r}: unsupported directive %{d}; allowed: {allowed}"
                )
            i += 2
        else:
            parts.append(re.escape(c))
            i += 1
    if not ({"Y", "y"} & seen) or not ({"m", "d"} <= seen or "j" in seen):
        raise ConfigError(
            f"filename pattern {pattern!r} must hold a date: %Y (or %y) with %m%d (or %j)"
        )
    return "".join(parts)


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern[str]:
    """The pattern as a regex that must start the stem and not run into more digits."""
    return re.compile(_regex_body(pattern) + r"(?!\d)")  # N20031221G0300012 holds no time


def _stem(name: str) -> str:
    """File name without folders and extension; a compression suffix goes too (.pgm.gz)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    low = base.lower()
    if low.endswith(_COMPRESSION_SUFFIXES):
        base = base[: base.rfind(".")]
    dot = base.rfind(".")
    return base[:dot] if dot > 0 else base


#: Valid component ranges (years: those of timestamp[ns]); pandas would roll hour 24 over.
_RANGES = {
    "year": (1678, 2261),
    "month": (1, 12),
    "day": (1, 31),
    "hour": (0, 23),
    "minute": (0, 59),
    "second": (0, 59),
}


def _datetime(g: dict[str, str | None]) -> datetime | None:
    try:
        year = int(g["Y"]) if g.get("Y") else None
        if year is None:
            yy = int(g["y"])  # type: ignore[arg-type]
            year = 2000 + yy if yy < 69 else 1900 + yy  # the C/POSIX %y convention
        hour, minute, second = (int(g.get(k) or 0) for k in ("H", "M", "S"))
        f = g.get("f")
        micro = int(f.ljust(6, "0")) if f else 0
        if not _RANGES["year"][0] <= year <= _RANGES["year"][1]:
            return None
        if g.get("j"):
            doy = int(g["j"])  # type: ignore[arg-type]
            if not 1 <= doy <= 366:
                return None
            dt = datetime(year, 1, 1, hour, minute, second, micro, tzinfo=timezone.utc)
            dt += timedelta(days=doy - 1)
            return dt if dt.year == year else None
        return datetime(
            year, int(g["m"]), int(g["d"]), hour, minute, second, micro, tzinfo=timezone.utc
        )  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return None


def parse_time(name: str, pattern: str) -> pd.Timestamp | None:
    """UTC time in a file name by a strftime ``pattern`` (N%Y%m%dG%H%M%S); None if absent."""
    m = _compile(pattern).match(_stem(name))
    if m is None:
        return None
    dt = _datetime(m.groupdict())
    return None if dt is None else pd.Timestamp(dt)


def _ints(struct: pa.StructArray, valid: pa.Array, name: str, pad: int = 0) -> np.ndarray:
    field = struct.field(name)
    if pad:
        field = pc.utf8_rpad(field, width=pad, padding="0")  # %f: "25" is 250000 us
    return pc.cast(pc.if_else(valid, field, "0"), pa.int64()).to_numpy(zero_copy_only=False)


def parse_times(names: Iterable[str], pattern: str) -> pd.DatetimeIndex:
    """Vectorised :func:`parse_time`: a UTC DatetimeIndex (ns), NaT where a name holds no time."""
    body = _regex_body(pattern)
    # One RE2 pass in Arrow instead of a Python match object per name (less GC pressure):
    # the pattern must start the file name and not run into more digits, as in parse_time.
    rx = r"(?:^|[/\\])" + body + r"(?:[^0-9/\\][^/\\]*)?$"
    arr = pa.array(names if isinstance(names, (list, tuple)) else list(names), pa.string())
    n = len(arr)
    if n == 0:
        return pd.DatetimeIndex([], dtype="datetime64[ns, UTC]")
    struct = pc.extract_regex(arr, rx)
    valid = pc.fill_null(struct.is_valid(), False)
    groups = {f.name for f in struct.type}
    zeros = np.zeros(n, dtype=np.int64)
    year = _ints(struct, valid, "Y") if "Y" in groups else _ints(struct, valid, "y")
    if "Y" not in groups:
        year = np.where(year < 69, 2000 + year, 1900 + year)  # the C/POSIX %y convention
    comp = {
        "year": year,
        "month": _ints(struct, valid, "m") if "m" in groups else zeros + 1,
        "day": _ints(struct, valid, "d") if "d" in groups else zeros + 1,
        "hour": _ints(struct, valid, "H") if "H" in groups else zeros,
        "minute": _ints(struct, valid, "M") if "M" in groups else zeros,
        "second": _ints(struct, valid, "S") if "S" in groups else zeros,
        "us": _ints(struct, valid, "f", pad=6) if "f" in groups else zeros,
    }
    ok = valid.to_numpy(zero_copy_only=False).copy()
    for key, (low, high) in _RANGES.items():
        ok &= (comp[key] >= low) & (comp[key] <= high)
    for key, value in comp.items():
        comp[key] = np.where(ok, value, _RANGES.get(key, (0, 0))[0])  # rows that end as NaT
    # invalid dates and times (month 13, 31 February, hour 24) become NaT instead of raising
    parsed = pd.to_datetime(pd.DataFrame(comp), errors="coerce")
    if "j" in groups:
        doy = _ints(struct, valid, "j")
        ok &= (doy >= 1) & (doy <= 366)
        parsed = parsed + pd.to_timedelta(np.where(ok, doy - 1, 0), unit="D")
        ok &= np.asarray(parsed.dt.year) == comp["year"]  # day 366 of a common year
    out = parsed.to_numpy(dtype="datetime64[ns]")
    out[~ok] = np.datetime64("NaT")
    return pd.DatetimeIndex(out).tz_localize("UTC")


# ----------------------------------------------------------------------------- walking


def _exclude_regex(exclude: Sequence[str]) -> re.Pattern[str] | None:
    if not exclude:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in exclude))


def _prune_regex(exclude: Sequence[str]) -> re.Pattern[str] | None:
    """Folders to skip whole: ``F/`` matches a glob ending in ``*``, as every file below would."""
    return _exclude_regex([g for g in exclude if g.endswith("*")])


def _walk(
    root: str, exts: tuple[str, ...], exclude: Sequence[str]
) -> tuple[list[str], list[int], list[int], list[tuple[str, str, str]]]:
    """Relative paths, sizes and mtimes (ns) of the files under ``root`` with one of ``exts``,
    and (path, error, message) of every entry named like a frame that is not a readable file.

    Hidden entries (``.name``, e.g. the ``.part`` files of interrupted writes) are skipped; so are
    folders whose path matches an exclude glob ending in ``*`` (every file below would match).
    A broken link, an unreadable file or a folder named like a frame is an error row: an archive
    copied from a station holds a few of each, and none may vanish without a record.
    """
    excl, prune = _exclude_regex(exclude), _prune_regex(exclude)
    rels: list[str] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    bad: list[tuple[str, str, str]] = []
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[str, str]] = [(root, "")]
    bar = tqdm(desc="scanning", unit=" files", disable=None, leave=False)
    while stack:
        bar.update(len(rels) - bar.n)
        folder, prefix = stack.pop()
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in seen:  # a symlink loop
                continue
            seen.add(key)
            it = os.scandir(folder)
        except OSError as exc:
            log.warning("%s: cannot list folder (%s); skipped", folder, exc.strerror or exc)
            continue
        with it:
            for entry in it:
                name = entry.name
                if name.startswith("."):
                    continue
                rel = prefix + name
                like_frame = name.lower().endswith(exts)
                try:
                    is_dir = entry.is_dir()
                except OSError as exc:
                    if like_frame:
                        bad.append((rel, "OSError", f"{entry.path}: cannot stat ({exc})"))
                    continue
                if is_dir:
                    if prune is not None and prune.match(rel + "/"):
                        continue
                    if like_frame and not (excl is not None and excl.match(rel)):
                        bad.append(
                            (rel, "IsADirectoryError", f"{entry.path}: a folder, not a frame")
                        )
                    stack.append((entry.path, rel + "/"))
                    continue
                if not like_frame or (excl is not None and excl.match(rel)):
                    continue
                problem = _unreadable(entry)
                if problem is not None:
                    bad.append((rel, *problem))
                    continue
                st = entry.stat()
                rels.append(rel)
                sizes.append(st.st_size)
                mtimes.append(st.st_mtime_ns)
    bar.close()
    return rels, sizes, mtimes, bad


def _unreadable(entry: os.DirEntry) -> tuple[str, str] | None:
    """(error, message) when a file entry named like a frame cannot be read, else None."""
    try:
        entry.stat()
    except OSError:
        target = os.readlink(entry.path) if entry.is_symlink() else "?"
        return "BrokenLink", f"{entry.path}: link to {target}, which does not exist"
    if not entry.is_file():
        return "NotAFile", f"{entry.path}: not a regular file"
    if not os.access(entry.path, os.R_OK):
        return "PermissionError", f"{entry.path}: no permission to read; fix its mode or owner"
    return None


def _read_list(path: Path) -> list[str]:
    """The ``path`` column of a CSV or Parquet list of frame paths."""
    try:
        if path.suffix.lower() == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file
        raise InputError(f"{path}: cannot read the list of paths ({exc})") from None
    if "path" not in df.columns:
        cols = ", ".join(map(str, df.columns)) or "none"
        raise InputError(f"{path}: a list of frames needs a 'path' column (found: {cols})")
    return [str(p) for p in df["path"] if str(p).strip()]


def _stat_list(
    listed: list[str], root: str, exts: tuple[str, ...], excl: re.Pattern[str] | None
) -> tuple[list[str], list[int], list[int], list[tuple[str, str, str]]]:
    """Stat the files of a path list; missing or foreign files become (path, error, message)."""
    rels: list[str] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    bad: list[tuple[str, str, str]] = []
    root_prefix = root.rstrip("/") + "/"
    for p in listed:
        p = p.strip().replace("\\", "/")
        if os.path.isabs(p):
            full = os.path.normpath(p)
            rel = full[len(root_prefix) :] if full.startswith(root_prefix) else full
        else:
            rel = os.path.normpath(p).replace("\\", "/")
            full = os.path.join(root, rel)
        if excl is not None and excl.match(rel):
            continue
        if not p.lower().endswith(exts):
            bad.append((rel, "UnsupportedExtension", f"not one of the station's {', '.join(exts)}"))
            continue
        try:
            st = os.stat(full)
        except OSError:
            bad.append((rel, "FileNotFoundError", f"{full}: listed file not found"))
            continue
        rels.append(rel)
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
    return rels, sizes, mtimes, bad


# ----------------------------------------------------------------------------- scan


def _header_times(path: str) -> list[pd.Timestamp] | FrameReadError:
    try:
        return pgm_times(path)
    except FrameReadError as exc:
        return exc


def _errors_frame(rows: list[tuple[str, int, str, str]]) -> pd.DataFrame:
    if not rows:
        return empty_frame(ERRORS_SCHEMA)
    path, frame, error, message = zip(*rows)
    df = pd.DataFrame(
        {
            "path": list(path),
            "frame": np.asarray(frame, dtype=np.int16),
            "stage": "scan",
            "error": list(error),
            "message": list(message),
        }
    )
    return df[list(ERRORS_SCHEMA.names)]


def _manifest_frame(
    paths: list[str],
    frames: list[int] | np.ndarray,
    times: pd.DatetimeIndex,
    code: str,
    sizes: list[int] | np.ndarray,
    mtimes: list[int] | np.ndarray,
) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "path": pd.Series(paths, dtype=str),
            "frame": np.asarray(frames, dtype=np.int16),
            "time_utc": times.as_unit("ns"),
            "station": pd.Series([code] * len(paths), dtype=str),
            "bytes": np.asarray(sizes, dtype=np.int64),
            "mtime": pd.to_datetime(np.asarray(mtimes, dtype=np.int64), unit="ns", utc=True),
        }
    )
    df = df.sort_values(["time_utc", "path", "frame"], kind="stable", ignore_index=True)
    return df


#: What a scan gives: the manifest and the errors table.
ScanTables = tuple[pd.DataFrame, pd.DataFrame]


@dataclass
class _Listing:
    """The files of a source that may be frames: paths relative to ``base``, sizes, mtimes,
    and (path, error, message) of the entries named like frames that cannot be read."""

    base: str
    rels: list[str]
    sizes: list[int]
    mtimes: list[int]
    bad: list[tuple[str, str, str]]


def _list_source(src: Path, exts: tuple[str, ...], exclude: tuple[str, ...]) -> _Listing:
    """List an archive folder (walk) or a CSV/Parquet list of paths (stat)."""
    if src.is_dir():
        base = os.path.abspath(src)
        return _Listing(base, *_walk(base, exts, exclude))
    if src.is_file() and src.suffix.lower() in _LIST_SUFFIXES:
        base = os.path.abspath(src.parent)
        excl = _exclude_regex(exclude)
        return _Listing(base, *_stat_list(_read_list(src), base, exts, excl))
    if src.exists():
        raise InputError(
            f"{src}: not an archive folder nor a CSV/Parquet list of paths (.csv, .parquet)"
        )
    raise InputError(f"{src}: archive not found")


def _name_times(
    listing: _Listing, files: list[int], pattern: str, err_rows: list[tuple[str, int, str, str]]
) -> tuple[list[int], np.ndarray]:
    """The files whose names hold a time (one vectorised parse), and those times (ns, naive UTC);
    the others become NoTimestamp rows of ``err_rows``."""
    times = parse_times((listing.rels[i] for i in files), pattern)
    keep = ~np.asarray(times.isna())
    for i, ok in zip(files, keep):
        if not ok:
            msg = f"file name does not hold a time in the station pattern {pattern!r}"
            err_rows.append((listing.rels[i], 0, "NoTimestamp", msg))
    timed = [i for i, ok in zip(files, keep) if ok]
    return timed, times[keep].tz_localize(None).as_unit("ns").to_numpy()


def _stack_times(
    listing: _Listing, files: list[int], err_rows: list[tuple[str, int, str, str]]
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """(file, frame) of every PGM-stack frame whose header holds a time, and those times (ns,
    naive UTC); header bytes only, never the pixel arrays. Failures become ``err_rows``."""
    # gzip inflation releases the GIL: a few threads read headers of many stacks in parallel
    with ThreadPoolExecutor(max_workers=max(1, min(8, usable_cores(), len(files)))) as pool:
        results = pool.map(
            _header_times, (os.path.join(listing.base, listing.rels[i]) for i in files)
        )
        bar = tqdm(
            results,
            total=len(files),
            desc="PGM headers",
            unit=" files",
            disable=None if len(files) >= 20 else True,
        )
        header_results = list(bar)
    rows: list[tuple[int, int]] = []
    times: list[pd.Timestamp] = []
    for i, found in zip(files, header_results):
        if isinstance(found, FrameReadError):
            err_rows.append((listing.rels[i], 0, "FrameReadError", found.reason))
            continue
        for k, t in enumerate(found):
            if pd.isna(t):
                msg = "frame header has no 'Image request start' time"
                err_rows.append((listing.rels[i], k, "NoTimestamp", msg))
                continue
            rows.append((i, k))
            times.append(t)
    if not times:
        return rows, np.empty(0, dtype="datetime64[ns]")
    return rows, pd.DatetimeIndex(times).tz_convert("UTC").tz_localize(None).as_unit(
        "ns"
    ).to_numpy()


def scan(
    root: str | os.PathLike,
    station: StationConfig,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> ScanTables:
    """Manifest (one row per frame, sorted by time) and errors (files without a time) of an archive.

    ``root`` is an archive folder, or a CSV/Parquet list of paths (column ``path``, relative to the
    list's folder or absolute). Pixels are never decoded. ``manifest.attrs["root"]`` is the folder
    that the manifest's relative paths start from.
    """
    exts = tuple(e.lower() for e in station.extensions)
    _compile(station.filename_pattern)  # a bad pattern fails before the walk
    listing = _list_source(Path(root), exts, tuple(exclude))
    err_rows: list[tuple[str, int, str, str]] = [(p, 0, e, m) for p, e, m in listing.bad]
    use_headers = station.time_source == "pgm_header"
    is_pgm = [use_headers and r.lower().endswith(PGM_SUFFIXES) for r in listing.rels]
    by_name = [i for i, h in enumerate(is_pgm) if not h]
    by_header = [i for i, h in enumerate(is_pgm) if h]
    named, name_ns = _name_times(listing, by_name, station.filename_pattern, err_rows)
    stacked, header_ns = _stack_times(listing, by_header, err_rows)
    rows = [(i, 0) for i in named] + stacked
    manifest = _manifest_frame(
        [listing.rels[i] for i, _ in rows],
        [k for _, k in rows],
        pd.DatetimeIndex(np.concatenate([name_ns, header_ns])).tz_localize("UTC"),
        station.code,
        [listing.sizes[i] for i, _ in rows],
        [listing.mtimes[i] for i, _ in rows],
    )
    manifest.attrs["root"] = listing.base
    return manifest, _errors_frame(sorted(err_rows))


# ----------------------------------------------------------------------------- manifest files


def write_manifest(
    df: pd.DataFrame, path: str | os.PathLike, root: str | os.PathLike | None = None
) -> Path:
    """Write the manifest atomically, with its schema and the archive root in Parquet metadata."""
    root = root if root is not None else df.attrs.get("root")
    table = pa.Table.from_pandas(
        df.reindex(columns=MANIFEST_SCHEMA.names), schema=MANIFEST_SCHEMA, preserve_index=False
    )
    if root is not None:
        meta = dict(table.schema.metadata or {})
        meta[ROOT_KEY] = os.path.abspath(root).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def _is_manifest(schema: pa.Schema) -> bool:
    meta = schema.metadata or {}
    return ROOT_KEY in meta or {"time_utc", "frame", "station"} <= set(schema.names)


def _read_manifest(path: Path) -> tuple[pd.DataFrame, str]:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - a broken file is the user's input
        raise InputError(f"{path}: cannot read the manifest ({exc})") from None
    missing = [c for c in MANIFEST_SCHEMA.names if c not in table.column_names]
    if missing:
        raise InputError(
            f"{path}: not a manifest (missing columns {', '.join(missing)}); "
            "make one with `aurora-pipeline scan`"
        )
    stored = (table.schema.metadata or {}).get(ROOT_KEY)
    root = stored.decode() if stored else ""
    if not root or not os.path.isdir(root):
        if root:
            log.info("%s: stored archive root %s is gone; using the manifest's folder", path, root)
        root = os.path.abspath(path.parent)
    df = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA).to_pandas()
    return df, root


def load_manifest(
    source: str | os.PathLike,
    station: StationConfig,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> pd.DataFrame:
    """Manifest rows plus an absolute ``abspath`` column, from an archive, manifest or path list.

    ``attrs["root"]`` is the folder the relative paths start from: the archive folder, the root
    stored in the manifest (its own folder if that root is gone), or the list's folder.
    """
    df, errors = load_manifest_and_errors(source, station, exclude)
    if len(errors):
        log.warning(
            "%s: %d file(s) named like frames skipped (no time, unreadable, broken link or "
            "folder; `aurora-pipeline scan` lists them)",
            source,
            len(errors),
        )
    return df


def load_manifest_and_errors(
    source: str | os.PathLike,
    station: StationConfig,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> ScanTables:
    """:func:`load_manifest` and the scan's error rows (stage ``scan``) of the same source.

    For a folder or a path list they come from the scan itself; for a manifest from the errors
    table that ``scan`` wrote beside it (none if it is gone).
    """
    src = Path(source)
    is_parquet = src.is_file() and src.suffix.lower() == ".parquet"
    schema = None
    if is_parquet:
        try:
            schema = pq.read_schema(src)
        except Exception as exc:  # noqa: BLE001 - a broken file is the user's input
            raise InputError(f"{src}: not a readable Parquet file ({exc})") from None
    if schema is not None and _is_manifest(schema):
        df, root = _read_manifest(src)
        errors = _manifest_scan_errors(src)
        other = sorted(set(df["station"].dropna().unique()) - {station.code})
        if len(df) and other:
            raise InputError(
                f"{src}: manifest is of station {', '.join(other)}, not {station.code!r}; "
                f"pass --station {other[0]} or rescan"
            )
    elif src.is_dir() or is_parquet or (src.is_file() and src.suffix.lower() == ".csv"):
        df, errors = scan(src, station, exclude)
        root = df.attrs["root"]
    elif src.exists():
        raise InputError(
            f"{src}: expected an archive folder, a manifest .parquet or a CSV/Parquet list of paths"
        )
    else:
        raise InputError(f"{src}: not found")
    df = df.reset_index(drop=True)
    df["abspath"] = [p if os.path.isabs(p) else os.path.join(root, p) for p in df["path"]]
    df.attrs["root"] = root
    return df, errors


def _manifest_scan_errors(manifest: Path) -> pd.DataFrame:
    """The scan rows of the errors table beside a manifest (empty if there is none)."""
    err = read_errors(default_errors_path(manifest))
    return err[err["stage"] == "scan"].reset_index(drop=True) if len(err) else err


# ----------------------------------------------------------------------------- the scan command


@dataclass(frozen=True)
class ScanResult:
    """What one ``aurora-pipeline scan`` wrote."""

    manifest_path: Path
    errors_path: Path | None
    n_frames: int
    n_files: int
    n_errors: int
    start: pd.Timestamp | None
    end: pd.Timestamp | None

    def summary(self) -> str:
        """One line for the terminal."""
        span = (
            f", {self.start:%Y-%m-%d %H:%M:%S} to {self.end:%Y-%m-%d %H:%M:%S} UTC"
            if self.start is not None
            else ""
        )
        errs = (
            f", {self.n_errors} error(s) -> {self.errors_path}" if self.n_errors else ", no errors"
        )
        return (
            f"scanned {self.n_frames} frame(s) in {self.n_files} file(s){span} "
            f"-> {self.manifest_path}{errs}"
        )


def default_errors_path(manifest: str | os.PathLike) -> Path:
    """errors.parquet beside manifest.parquet; ``<name>.errors.parquet`` beside another name, so
    two manifests in one folder keep their own scan errors."""
    m = Path(manifest)
    if m.name == "manifest.parquet":
        return m.parent / "errors.parquet"
    return m.parent / f"{m.stem}.errors.parquet"


def _refuse_manifest_out(out: Path) -> None:
    """InputError when OUT is a folder or lies in another stage's output folder.

    A workflow's folder (run record of ``run``) holds its stages' outputs, a manifest among them.
    """
    if out.is_dir():
        raise InputError(
            f"--out {out} is a folder; give `scan` the manifest's file name, "
            f"e.g. {out / 'manifest.parquet'}"
        )
    folder = out.parent
    record = read_run_record(folder)
    other = None if record is None else record.get("command")
    if record is not None and other != "run":
        what = COMMAND_OUTPUTS.get(str(other), f"the output of `{other}`")
        raise InputError(
            f"--out {out}: {folder} holds {what} ({RUN_RECORD}); write the manifest elsewhere"
        )
    for name in CHECKPOINT_FILES:
        if (folder / name).exists():
            raise InputError(
                f"--out {out}: {folder} holds a checkpoint ({name}); write the manifest elsewhere"
            )


def scan_to_files(
    archive: str | os.PathLike,
    station: StationConfig,
    out: str | os.PathLike,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    errors_out: str | os.PathLike | None = None,
) -> ScanResult:
    """Scan ``archive``, write the scan's errors (if any) and then the manifest to ``out``.

    The manifest is written last and atomically: once it is there, so is its errors table.
    """
    out = Path(out)
    _refuse_manifest_out(out)
    manifest, errors = scan(archive, station, exclude)
    if not len(manifest):
        exts = ", ".join(station.extensions)
        others = f"; {len(errors)} other files" if len(errors) else ""
        raise InputError(
            f"{archive}: no frames of station {station.code} found (files {exts} named like "
            f"{station.filename_pattern}{others}); pass the archive's --station"
        )
    errors_path = Path(errors_out) if errors_out is not None else default_errors_path(out)
    written = len(replace_stage_errors(errors_path, errors, "scan")) > 0
    write_manifest(manifest, out, manifest.attrs["root"])
    times = manifest["time_utc"]
    return ScanResult(
        manifest_path=out,
        errors_path=errors_path if written else None,
        n_frames=len(manifest),
        n_files=int(manifest["path"].nunique()),
        n_errors=len(errors),
        start=times.iloc[0] if len(times) else None,
        end=times.iloc[-1] if len(times) else None,
    )

"""Writing synthetic sets and archives: a plan rendered frame by frame into OUT, resumably.

OUT follows the output-folder protocol (docs/design.md, "Output folders"): its run record
``_run.json`` (command ``synth``) holds the parameters, the camera seasons and the version, and
says ``finished: false`` from before the first frame until the table is written. Frames depend
on (seed, index) only and are written atomically, so an unfinished run of the same parameters
is finished by keeping the frames on disk and rendering the missing ones.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from pipeline import __version__
from pipeline.config import dump_yaml
from pipeline.errors import InputError
from pipeline.imageio import write_frame
from pipeline.output_folder import RUN_RECORD, OutputFolder
from pipeline.storage import atomic_path, write_table
from pipeline.synth.geometry import _station
from pipeline.synth.render import AMBIGUOUS_SHARE, TRANSITION_SHARE, frame_rng, render_frame
from pipeline.synth.season import dark_frame, season_for
from pipeline.synth.timeline import archive_plan, labelled_plan, winter_of

log = logging.getLogger(__name__)

COMMAND = "synth"
#: Frame sizes synth renders (a 4096 px frame needs a few GB of memory; larger ones exhaust it).
MIN_SIZE, MAX_SIZE = 32, 4096
#: The parameters a user gives; named when an earlier synth in a folder used others.
_USER_PARAMS = ("kind", "n", "seed", "winter", "balanced", "timeline", "winters", "size")
#: A frame to render: (index, class, relative path, time in ns, neighbouring class or '').
Item = tuple[int, str, str, int, str]


# ------------------------------------------------------------------------------ rendering
def _render_chunk(out: str, size: int, seed: int, items: list[Item]) -> int:
    """Render and write the frames of one chunk (a process-pool task); returns their count."""
    for index, label, rel, t_ns, transition in items:
        time = pd.Timestamp(t_ns, tz="UTC")
        season = season_for(winter_of(time))
        rng = frame_rng(seed, index)
        arr = render_frame(label, rng, size, season, time=time, transition=transition or None)
        write_frame(Path(out) / rel, arr)
    return len(items)


def _items(plan: pd.DataFrame) -> list[Item]:
    trans = plan["transition"] if "transition" in plan else [""] * len(plan)
    return [
        (i, str(lab), str(rel), int(t.value), str(tr))
        for i, (lab, rel, t, tr) in enumerate(
            zip(plan["label"], plan["path"], plan["time_utc"], trans)
        )
    ]


def _render_all(
    out: Path,
    plan: pd.DataFrame,
    seed: int,
    size: int,
    workers: int,
    desc: str,
    skip_existing: bool = False,
) -> None:
    """Render every frame of ``plan`` into ``out``; ``skip_existing`` keeps the frames already
    there (an interrupted run of this same plan: frames are written atomically and depend on
    (seed, index) only, so each one on disk is complete and right)."""
    items = _items(plan)
    if skip_existing:
        n_all = len(items)
        items = [it for it in items if not (out / it[2]).is_file()]
        log.info(
            "%s: %d of %d frames already rendered; rendering the rest",
            out,
            n_all - len(items),
            n_all,
        )
    chunk = max(1, min(32, len(items) // (4 * max(workers, 1)) or 1))
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    with tqdm(total=len(items), desc=desc, unit="frame", disable=None) as bar:
        if workers <= 1:
            for ch in chunks:
                bar.update(_render_chunk(str(out), size, seed, ch))
        else:
            _render_parallel(str(out), size, seed, chunks, workers, bar.update)


def _render_parallel(
    out: str,
    size: int,
    seed: int,
    chunks: list[list[Item]],
    workers: int,
    progress: Callable[[int], object],
) -> None:
    """Render ``chunks`` in ``workers`` processes, a few chunks in flight at a time.

    Only a few chunks are submitted ahead, not all of them: on Ctrl-C or a failed chunk only
    those finish (queued ones are not reliably cancelled at exit), and a large plan holds a few
    futures, not thousands.
    """
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_sigint)
    todo = iter(chunks)
    try:
        pending = {
            pool.submit(_render_chunk, out, size, seed, ch)
            for ch in itertools.islice(todo, 2 * workers)
        }
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                progress(fut.result())
                nxt = next(todo, None)
                if nxt is not None:
                    pending.add(pool.submit(_render_chunk, out, size, seed, nxt))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _ignore_sigint() -> None:
    """Render workers leave Ctrl-C to the parent, which stops them (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_calib(out: Path, winters: Iterable[int], size: int) -> None:
    for w in sorted(set(winters)):
        write_frame(out / "calib" / season_for(w).dark_name, dark_frame(w, size))
    if size != 512:
        with atomic_path(out / "calib" / "station.yaml") as tmp:
            dump_yaml(_station(size), tmp)


# ------------------------------------------------------------------------------ the output folder
def _run_record(kind: str, seasons: Iterable[int], **params) -> dict:
    """The settings of a synthetic folder's run record: parameters, camera seasons, version."""
    run = {
        "kind": kind,
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()},
        "ambiguous_share": AMBIGUOUS_SHARE,
        "transition_share": TRANSITION_SHARE,
        "seasons": {str(w): dataclasses.asdict(season_for(w)) for w in sorted(set(seasons))},
        "pipeline_version": __version__,
    }
    return json.loads(json.dumps(run))  # as it reads back from the record (tuples as lists)


def _count(k: int, word: str, plural: str | None = None) -> str:
    return f"{k} {word if k == 1 else plural or word + 's'}"


def _describe(out: Path, earlier: dict | None, run: dict) -> str:
    """What is in a non-empty ``out``, for the refusal: frames, table, earlier parameters."""
    frames = sum(1 for p in out.rglob("*.png") if "calib" not in p.relative_to(out).parts)
    names = sorted(p.name for p in out.iterdir())
    if earlier is None:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        what = f"{_count(frames, 'frame')} and " if frames else ""
        return f"{what}{_count(len(names), 'entry', 'entries')}: {shown}; no {RUN_RECORD}"
    tables = [t for t in ("labels.parquet", "truth.parquet") if (out / t).is_file()]
    what = _count(frames, "frame") + "".join(f" and {t}" for t in tables)
    diff = [
        f"{k}={earlier.get(k)!r} (now {run.get(k)!r})"
        for k in _USER_PARAMS
        if earlier.get(k) != run.get(k)
    ]
    if diff:
        why = "with " + ", ".join(diff)
    elif run.get("timeline") == "DataFrame":
        why = f"made from a timeline DataFrame ({RUN_RECORD} cannot tell it from this one)"
    elif earlier.get("pipeline_version") != run.get("pipeline_version"):
        why = f"of pipeline {earlier.get('pipeline_version')}"
    else:
        why = "of another generator version"
    return f"{what} from an earlier synth {why}"


def _clear(folder: Path) -> None:
    """Delete everything in ``folder`` (an earlier synth run's output: --overwrite)."""
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _earlier_result(
    folder: OutputFolder, table: str, comparable: bool, overwrite: bool
) -> pd.DataFrame | None:
    """Check that OUT may be written; the earlier result when it already holds this run.

    An empty folder is written. A folder whose run record holds exactly this run's settings
    (parameters, camera seasons, version; ``--workers`` never changes the output) is either
    finished (the table and every frame present: nothing is redone, and the table is returned)
    or an interrupted run of it, which is finished. Anything else is refused: new frames would
    mix with the old ones and the table would describe only the new. ``overwrite`` deletes
    another synth run's output first (never a folder synth did not write).
    """
    out = folder.path
    if not any(out.iterdir()):
        return None
    earlier = folder.previous()
    same = comparable and earlier is not None and folder.same_settings()
    if not same and overwrite and earlier is not None:
        log.warning("%s: replacing an earlier synthetic set (--overwrite)", out)
        _clear(out)
        return None
    if not same:
        again = ", --overwrite to replace it" if earlier is not None else ""
        raise InputError(
            f"{out} is not empty ({_describe(out, earlier, folder.record)}); "
            f"choose another folder{again} or delete it"
        )
    done = _finished_table(out, table) if earlier.get("finished") is True else None
    if done is not None:
        log.warning(
            "%s already holds this synthetic set (%s); nothing rewritten "
            "(delete the folder to render it again)",
            out,
            RUN_RECORD,
        )
        return done
    log.warning("%s holds an unfinished run of this synth (%s); finishing it", out, RUN_RECORD)
    return None


def _finished_table(out: Path, table: str) -> pd.DataFrame | None:
    """The table of a finished run when it and every frame it lists are in ``out``."""
    try:
        done = pd.read_parquet(out / table)
    except Exception:  # noqa: BLE001 - missing or damaged table: render again
        return None
    return done if all((out / rel).is_file() for rel in done["path"]) else None


def _check(n: int, seed: int, size: int, workers: int) -> None:
    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    if seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(
            f"--size must be within {MIN_SIZE}..{MAX_SIZE} pixels (the YRS camera's is 512), "
            f"got {size}"
        )
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")


@dataclasses.dataclass(frozen=True)
class _Job:
    """One synth run: what to render, where the table goes, how the folder is judged."""

    plan: pd.DataFrame
    table: pd.DataFrame
    table_name: str
    seasons: list[int]
    run: dict
    seed: int
    size: int
    desc: str
    comparable: bool = True


def _synthesise(out: str | os.PathLike, job: _Job, workers: int, overwrite: bool) -> pd.DataFrame:
    """Render ``job`` into OUT (resuming an unfinished run of it) and write its table last."""
    with OutputFolder(out, COMMAND, job.run, owns=("labels.parquet",)) as folder:
        done = _earlier_result(folder, job.table_name, job.comparable, overwrite)
        if done is not None:
            return done
        resuming = any(folder.path.iterdir())  # an unfinished run of this same job
        folder.begin()
        _write_calib(folder.path, job.seasons, job.size)
        _render_all(folder.path, job.plan, job.seed, job.size, workers, job.desc, resuming)
        write_table(job.table, folder.path / job.table_name)
        folder.finish()
    return job.table


# ------------------------------------------------------------------------------ public API
def make_labelled(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    winter: int = 2003,
    balanced: bool = False,
    size: int = 512,
    workers: int = 1,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write an ImageFolder-style labelled set of raw frames plus labels.parquet and calib/.

    ``out`` must be new or empty, or hold this same set (see :func:`_earlier_result`).
    """
    _check(n, seed, size, workers)
    plan = labelled_plan(n, seed, winter, balanced)
    run = _run_record(
        "labelled", [winter], n=n, seed=seed, winter=winter, balanced=balanced, size=size
    )
    job = _Job(plan, plan, "labels.parquet", [winter], run, seed, size, f"synth labelled {winter}")
    return _synthesise(out, job, workers, overwrite)


def make_archive(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    timeline: str | os.PathLike | pd.DataFrame | None = None,
    winters: Sequence[int] = (2004,),
    size: int = 512,
    workers: int = 1,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write an unlabelled archive in the YRS layout plus truth.parquet and calib/ dark frames.

    ``out`` must be new or empty, or hold this same archive (see :func:`_earlier_result`; a
    timeline given as a DataFrame is never taken as the same: its content is not recorded).
    """
    _check(n, seed, size, workers)
    plan = archive_plan(n, seed, timeline, winters)
    seasons = plan["winter"].unique().tolist()
    source = "DataFrame" if isinstance(timeline, pd.DataFrame) else timeline
    run = _run_record(
        "archive", seasons, n=n, seed=seed, timeline=source, winters=list(winters), size=size
    )
    truth = plan[["path", "time_utc", "label"]]
    job = _Job(
        plan, truth, "truth.parquet", seasons, run, seed, size, "synth archive",
        comparable=source != "DataFrame",
    )  # fmt: skip
    return _synthesise(out, job, workers, overwrite)


def parse_winters(text: str) -> tuple[int, ...]:
    """Parse ``2004-2009`` or ``2004,2006`` (or a mix) into a sorted tuple of winters."""
    out: set[int] = set()
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise InputError(f"winters {text!r}: expected e.g. 2004-2009 or 2004,2006") from None
    if not out or min(out) < 1990 or max(out) > 2100:
        raise InputError(f"winters {text!r}: expected years such as 2004-2009 or 2004,2006")
    return tuple(sorted(out))

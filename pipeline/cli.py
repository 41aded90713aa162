"""The ``aurora-pipeline`` command line: argument parsing and one call per command, no logic."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import click

from pipeline import __version__
from pipeline.errors import AuroraError, InputError

PathArg = click.Path(path_type=Path)
ExistingPath = click.Path(exists=True, path_type=Path)


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r}: use auto, cpu, cuda or cuda:N")
    return value


#: The torch device of a stage (pipeline.devices.resolve_device turns it into one).
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=_check_device,
    help="auto (CUDA where visible, else CPU), cpu, cuda or cuda:N.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aurora-pipeline")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Classify all-sky auroral images and build MLT occurrence statistics."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Dask's scheduler logs its start and stop at INFO (dozens of lines that bury a run's
    # summary); distributed reads this when first imported, here and in worker processes.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", logging.getLevelName(level).lower())


# ------------------------------------------------------------------------------ scan
@cli.command()
@click.argument("archive", type=ExistingPath)
@click.option("--station", default="yrs", show_default=True, help="Station name or YAML path.")
@click.option(
    "-o", "--out", "out", type=PathArg, default=Path("manifest.parquet"), show_default=True
)
@click.option(
    "--exclude",
    multiple=True,
    default=("calib/*", "*/calib/*"),
    show_default=True,
    help="Glob of paths (relative to ARCHIVE) to skip; repeatable.",
)
@click.option(
    "--errors",
    "errors_out",
    type=PathArg,
    default=None,
    help="Errors table (default: errors.parquet beside manifest.parquet, NAME.errors.parquet "
    "beside NAME.parquet).",
)
def scan(
    archive: Path, station: str, out: Path, exclude: tuple[str, ...], errors_out: Path | None
) -> None:
    """Find the frames of ARCHIVE (a folder, or a CSV/Parquet list of paths); write the manifest."""
    from pipeline.archive import scan_to_files
    from pipeline.config import load_station

    result = scan_to_files(archive, load_station(station), out, exclude, errors_out)
    click.echo(result.summary())


# ------------------------------------------------------------------------------ synth
@cli.group()
def synth() -> None:
    """Make synthetic YRS-like 557.7 nm frames: labelled sets and whole archives."""


@synth.command("labelled")
@click.argument("out", type=PathArg)
@click.option("--n", "n", type=click.IntRange(1), default=800, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option(
    "--winter", type=int, default=2003, show_default=True, help="Winter (its December's year)."
)
@click.option("--balanced", is_flag=True, help="Equal class counts (ASI2K-style test set).")
@click.option(
    "--size", type=click.IntRange(32), default=512, show_default=True, help="Frame size in pixels."
)
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--overwrite", is_flag=True, help="Replace an earlier synthetic set in OUT (workflows rerun)."
)
def synth_labelled(
    out: Path,
    n: int,
    seed: int,
    winter: int,
    balanced: bool,
    size: int,
    workers: int,
    overwrite: bool,
) -> None:
    """Write an ImageFolder-style labelled set OUT/<class>/<name>.png with labels.parquet."""
    from pipeline.synth import make_labelled

    labels = make_labelled(out, n, seed, winter, balanced, size, workers, overwrite)
    counts = ", ".join(f"{c} {k}" for c, k in labels["label"].value_counts().items())
    click.echo(f"wrote {len(labels)} raw {size}x{size} frames ({counts}) to {out}")


@synth.command("archive")
@click.argument("out", type=PathArg)
@click.option(
    "--timeline",
    type=ExistingPath,
    default=None,
    help="Expert label file (Alllabel2003_38044.txt) whose times and classes to follow.",
)
@click.option("--n", "n", type=click.IntRange(1), default=2000, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option(
    "--winters", default="2004", show_default=True, help="Winters, e.g. 2004-2009 or 2004,2006."
)
@click.option("--size", type=click.IntRange(32), default=512, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--overwrite", is_flag=True, help="Replace an earlier synthetic set in OUT (workflows rerun)."
)
def synth_archive(
    out: Path,
    timeline: Path | None,
    n: int,
    seed: int,
    winters: str,
    size: int,
    workers: int,
    overwrite: bool,
) -> None:
    """Write an unlabelled archive in the YRS layout with truth.parquet and calib/ dark frames."""
    from pipeline.synth import make_archive, parse_winters

    try:
        years = parse_winters(winters)
    except InputError as exc:
        raise click.BadParameter(str(exc), param_hint="--winters") from None
    truth = make_archive(out, n, seed, timeline, years, size, workers, overwrite)
    span = f"{truth['time_utc'].min():%Y-%m-%d} .. {truth['time_utc'].max():%Y-%m-%d}"
    click.echo(f"wrote {len(truth)} raw {size}x{size} frames ({span}) to {out}")


# ------------------------------------------------------------------------------ preprocess
@cli.command()
@click.argument("input_", metavar="INPUT", type=ExistingPath)
@click.option(
    "--out",
    type=PathArg,
    required=True,
    help="Output folder: INPUT's layout, errors.parquet, _run.json (the run record).",
)
@click.option(
    "--station",
    default=None,
    help="Station name or YAML path (default: INPUT/calib/station.yaml if present, else yrs).",
)
@click.option(
    "--dark", type=ExistingPath, default=None, help="One dark frame for every input frame."
)
@click.option(
    "--dark-dir",
    type=ExistingPath,
    default=None,
    help="Dark frames chosen by date (default: INPUT/calib if it holds dark_<YYYYMMDD>.png).",
)
@click.option(
    "--workers", type=click.IntRange(1), default=None, help="Worker processes (default: cores/2)."
)
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["png", "npy", "zarr"]),
    default="png",
    show_default=True,
    help="png: 8-bit; npy: float32 in [0, 1]; zarr: a frame store (OUT) at --input-size, "
    "which classify-archive, index and evaluate read instead of the frames.",
)
@click.option(
    "--input-size",
    type=click.IntRange(1),
    default=None,
    help="--format zarr: the model input size the store holds frames at (default: an existing "
    "store's, else 227).",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(1),
    default=None,
    help="Frames per Dask task (default: automatic, at most 64).",
)
def preprocess(
    input_: Path,
    out: Path,
    station: str | None,
    dark: Path | None,
    dark_dir: Path | None,
    workers: int | None,
    scheduler: str | None,
    fmt: str,
    input_size: int | None,
    chunk_size: int | None,
) -> None:
    """Subtract system noise, crop and mask every frame of INPUT.

    INPUT is an archive, a manifest or a labelled set.
    """
    from pipeline.preprocess_stage import run_preprocess

    summary = run_preprocess(
        input_,
        out,
        station=station,
        dark=dark,
        dark_dir=dark_dir,
        workers=workers,
        scheduler=scheduler,
        fmt=fmt,
        chunk_size=chunk_size,
        input_size=input_size,
    )
    click.echo(summary.line())
    if summary.failed and not (summary.written or summary.passed_through or summary.up_to_date):
        first = summary.errors[0] if summary.errors else "see errors.parquet"
        raise AuroraError(
            f"no frame could be preprocessed: all {summary.failed} failed (first: {first}); "
            f"they are listed in {out}/{summary.errors_file}; check --station and the files"
        )


# ------------------------------------------------------------------------------ train / evaluate
@cli.command()
@click.option("--config", "config_path", type=ExistingPath, required=True)
@click.option("--data", type=ExistingPath, required=True, help="Labelled set with labels.parquet.")
@click.option("--out", type=PathArg, required=True, help="Checkpoint directory.")
@click.option("--resume", is_flag=True, help="Continue from the last epoch in OUT.")
@click.option(
    "--overwrite", is_flag=True, help="Replace another training run in OUT (workflows rerun)."
)
@click.option(
    "--init-weights", type=ExistingPath, default=None, help="Local torchvision ImageNet weights."
)
@click.option(
    "--init-from",
    type=ExistingPath,
    default=None,
    help="Start from a checkpoint of this project (e.g. from `aurora-pipeline pretrain`).",
)
@device_option
@click.option(
    "--station",
    default=None,
    help="Station name or YAML for raw frames (default: DATA/calib/station.yaml, else the "
    "config's station, else yrs).",
)
def train(
    config_path: Path,
    data: Path,
    out: Path,
    resume: bool,
    overwrite: bool,
    init_weights: Path | None,
    init_from: Path | None,
    device: str,
    station: str | None,
) -> None:
    """Train a classifier variant on a labelled set."""
    from pipeline.train import load_train_config
    from pipeline.train import train as run_train

    if init_weights is not None and init_from is not None:
        raise InputError("give --init-weights (ImageNet) or --init-from (a checkpoint), not both")
    cfg = load_train_config(config_path)
    res = run_train(
        cfg,
        data,
        out,
        resume=resume,
        overwrite=overwrite,
        init_weights=init_weights,
        init_from=init_from,
        device=device,
        station=station,
        config_source=str(config_path),
    )
    kept = (
        f"best validation {res['selected_on'].replace('_', ' ')} {res['best_val_accuracy']:.3f}"
        if res["n_val"]
        else "no validation frames, last epoch kept"
    )
    click.echo(
        f"{cfg.variant}: {kept} at epoch {res['best_epoch']} of {res['epochs_run']} "
        f"({res['n_train']} train / {res['n_val']} val frames, {res['device']}); "
        f"checkpoint in {out}"
    )


@cli.command()
@click.option("--checkpoint", type=ExistingPath, required=True)
@click.option("--data", type=ExistingPath, required=True)
@click.option("--out", type=PathArg, required=True)
@device_option
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option(
    "--station",
    default=None,
    help="Station name or YAML for raw frames (default: DATA/calib/station.yaml, else yrs).",
)
@click.option("--no-timing", is_flag=True, help="Skip the time-per-image measurement.")
def evaluate(
    checkpoint: Path,
    data: Path,
    out: Path,
    device: str,
    batch_size: int,
    station: str | None,
    no_timing: bool,
) -> None:
    """Per-class accuracy, confusion matrix and time per image of a checkpoint on a labelled set
    (or on a frame store of one, `preprocess LABELLED --format zarr`)."""
    from pipeline.evaluate import evaluate_checkpoint, summary_line

    res = evaluate_checkpoint(
        checkpoint,
        data,
        out,
        device=device,
        batch_size=batch_size,
        station=station,
        timing=not no_timing,
    )
    click.echo(f"{res['variant']}: {summary_line(res)}; metrics in {out}")


@cli.command()
@click.option("--config", "config_path", type=ExistingPath, required=True)
@click.option("--data", type=ExistingPath, required=True, help="Labelled set with labels.parquet.")
@click.option("--out", type=PathArg, required=True, help="Folder for the folds and the summary.")
@click.option("--folds", type=click.IntRange(2), default=5, show_default=True)
@click.option(
    "--group",
    default="episode",
    show_default=True,
    help="labels.parquet column whose groups stay whole within a fold ('day': the UT date).",
)
@click.option(
    "--variants",
    default=None,
    help="Comma-separated model variants to cross-validate (default: the config's).",
)
@click.option(
    "--init-from", type=ExistingPath, default=None, help="Start every fold from this checkpoint."
)
@click.option("--keep-checkpoints", is_flag=True, help="Keep each fold's model weights.")
@click.option(
    "--fold",
    "only_folds",
    type=int,
    multiple=True,
    help="Run only this fold (0-based; repeatable), e.g. one per job; then cv again without "
    "--fold into the same --out writes the summary from the finished folds.",
)
@device_option
@click.option("--station", default=None, help="Station name or YAML for raw frames.")
def cv(
    config_path: Path,
    data: Path,
    out: Path,
    folds: int,
    group: str,
    variants: str | None,
    init_from: Path | None,
    keep_checkpoints: bool,
    only_folds: tuple[int, ...],
    device: str,
    station: str | None,
) -> None:
    """Cross-validate by episode: folds of whole episodes, stratified by class (resumable)."""
    from pipeline.classes import CLASSES
    from pipeline.cv import cross_validate, summary_frame
    from pipeline.train import load_train_config

    cfg = load_train_config(config_path)
    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    table = cross_validate(
        cfg, data, out, folds=folds, group=group, variants=names, init_from=init_from,
        device=device, station=station, keep_checkpoints=keep_checkpoints,
        only_folds=only_folds,
    )  # fmt: skip
    if only_folds and table["fold"].nunique() < folds:
        for r in table.itertuples(index=False):
            acc = f"{r.mean_class_accuracy:.3f}, overall {r.average_accuracy:.3f}"
            click.echo(f"{r.variant} fold {r.fold}: mean per-class accuracy {acc}")
        click.echo(f"folds in {out}; run cv again without --fold there for the summary")
        return
    for r in summary_frame(table, CLASSES).itertuples(index=False):
        click.echo(
            f"{r.variant}: mean per-class accuracy {r.mean_class_accuracy_mean:.3f} "
            f"± {r.mean_class_accuracy_std:.3f}, overall {r.average_accuracy_mean:.3f} "
            f"± {r.average_accuracy_std:.3f} over {folds} folds"
        )
    click.echo(f"per-fold table and figure in {out} (cv.md, cv.png)")


@cli.command()
@click.argument("sources", nargs=-1, required=True, type=ExistingPath)
@click.option("--config", "config_path", type=ExistingPath, required=True)
@click.option("--out", type=PathArg, required=True, help="Checkpoint folder to write.")
@device_option
@click.option("--station", default=None, help="Station name or YAML for raw frames.")
def pretrain(
    sources: tuple[Path, ...], config_path: Path, out: Path, device: str, station: str | None
) -> None:
    """Self-supervised pre-training (SimCLR) on unlabelled frames: archives, manifests or
    labelled sets (their labels unused). `train --init-from OUT` starts from it."""
    from pipeline.pretrain import load_pretrain_config
    from pipeline.pretrain import pretrain as run_pretrain

    cfg = load_pretrain_config(config_path)
    res = run_pretrain(cfg, sources, out, device=device, station=station)
    bad = f" ({res['unreadable']} unreadable: errors.parquet)" if res["unreadable"] else ""
    click.echo(
        f"{cfg.variant}: pre-trained on {res['frames']} frames{bad} for {res['epochs']} "
        f"epochs; checkpoint in {out}"
    )


# ------------------------------------------------------------------------------ classify-archive
@cli.command("classify-archive")
@click.argument("source", metavar="ARCHIVE_MANIFEST_OR_STORE", type=ExistingPath)
@click.option("--checkpoint", type=ExistingPath, required=True)
@click.option("--out", type=PathArg, required=True, help="Predictions directory.")
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=None,
    help="Worker processes of a local cluster (default: one per two cores; several per GPU).",
)
@click.option("--threads-per-worker", type=click.IntRange(1), default=None)
@click.option(
    "--scheduler",
    default=None,
    help="Address of a running Dask scheduler (tcp://HOST:8786) instead of a local cluster.",
)
@click.option(
    "--station",
    default=None,
    help="Station name or YAML path (default: the archive's calib/station.yaml, else yrs).",
)
@click.option(
    "--dark-dir",
    type=ExistingPath,
    default=None,
    help="Folder of dark_YYYYMMDD.png frames (default: the archive's calib/).",
)
@click.option(
    "--shard-size",
    type=click.IntRange(1),
    default=512,
    show_default=True,
    help="Frames per task and per predictions file.",
)
@click.option(
    "--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Model batch."
)
@device_option
@click.option(
    "--preprocessed", is_flag=True, help="Frames are already preprocessed (crop_size square)."
)
@click.option(
    "--since",
    default=None,
    help="Only frames after this UTC date or time, e.g. 2009-01-01 or 2009-01-01T06:00.",
)
@click.option("--features", is_flag=True, help="Also write FC7 features per shard (float16).")
@click.option("--overwrite", is_flag=True, help="Replace what OUT holds (another model, archive).")
@click.option(
    "--retry-errors",
    is_flag=True,
    help="Classify again the frames in OUT/_errors.parquet (files repaired or copied since).",
)
@click.option(
    "--decode-threads",
    type=click.IntRange(1),
    default=None,
    help="Decoding threads per worker (default: the torch threads on CPU, the cores on GPU).",
)
def classify_archive(source: Path, checkpoint: Path, out: Path, **kwargs: object) -> None:
    """Classify every frame of an archive, manifest or frame store on a Dask cluster (resumable).

    A frame store (`preprocess --format zarr`) is read chunk by chunk, not decoded; its input
    size must be the checkpoint's.

    --threads-per-worker sets the torch threads of each worker (default: its share of the cores);
    each worker runs one shard at a time and decodes the next batch while the model runs.
    """
    from pipeline.classify import classify_archive as run_classify
    from pipeline.classify import print_summary

    summary = run_classify(source, checkpoint, out, **kwargs)  # type: ignore[arg-type]
    print_summary(summary)
    if summary.nothing_new_succeeded:
        raise AuroraError(
            f"no frame could be classified: all {summary.frames_errors} are in "
            f"{out}/_errors.parquet (first: {summary.first_error}); check --station and the files"
        )


# ------------------------------------------------------------------------------ occurrence
@cli.command()
@click.argument("pred", type=ExistingPath)
@click.option(
    "--bins", default="3min", show_default=True, help="Bin width (pandas offset: 3min, 0.5h)."
)
@click.option(
    "--mlt-range",
    nargs=2,
    type=float,
    default=(6.0, 18.0),
    show_default=True,
    help="MLT hours binned: START END (END past 24 crosses midnight, e.g. 22 26).",
)
@click.option(
    "--station",
    default=None,
    help="Station name or YAML (default: the one classify-archive recorded, else yrs).",
)
@click.option(
    "--mlt-method",
    type=click.Choice(["offset", "aacgm"]),
    default=None,
    help="Default: the station's method.",
)
@click.option(
    "--by",
    type=click.Choice(["year", "winter", "day"]),
    default=None,
    help="One table per group (winter: July-June, named by its December's year).",
)
@click.option(
    "--ci",
    is_flag=True,
    help="95% intervals per ratio (Wilson, with the frames of one UT day as one cluster).",
)
@click.option("--correct", type=ExistingPath, default=None, help="confusion.parquet of evaluate.")
@click.option(
    "--min-frames",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Grey out bins with fewer frames in the figure.",
)
@click.option(
    "--min-prob",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.0,
    show_default=True,
    help="Leave out frames whose most probable class is below this (e.g. 0.6): a partial screen "
    "for frames that fit no class (no aurora, cloud); they are counted as uncertain.",
)
@click.option(
    "--min-sky",
    default=None,
    help="Leave out frames whose sky level (mean brightness as the model sees it, 0..1) is "
    "below this; 'model': below every frame the model was trained on (a screen for empty or "
    "overcast sky, which a model calls some class); they are counted as too dim.",
)
@click.option(
    "--regions",
    type=ExistingPath,
    default=None,
    help="Active-regions YAML for the figure (default: configs/occurrence/regions.yaml).",
)
@click.option("--out", type=PathArg, required=True)
def occurrence(
    pred: Path,
    bins: str,
    mlt_range: tuple[float, float],
    station: str | None,
    mlt_method: str | None,
    by: str | None,
    ci: bool,
    correct: Path | None,
    min_frames: int,
    min_prob: float,
    min_sky: str | None,
    regions: Path | None,
    out: Path,
) -> None:
    """Occurrence ratio of each class per MLT bin (table, NetCDF and the paper's Fig. 7).

    PRED: a classify-archive predictions folder, a Parquet table with time_utc (or mlt) and
    label, or an expert label file (one "name code" per line, like Alllabel2003_38044.txt).
    """
    from pipeline.occurrence_stage import format_summary, run_occurrence

    info = run_occurrence(
        pred,
        out,
        bins=bins,
        mlt_range=mlt_range,
        station=station,
        mlt_method=mlt_method,
        by=by,
        ci=ci,
        correct=correct,
        min_frames=min_frames,
        regions=regions,
        min_prob=min_prob,
        min_sky=min_sky,
    )
    click.echo(format_summary(info))


# ------------------------------------------------------------------------------ retrieval
@cli.command()
@click.argument("image_set", metavar="SET", type=ExistingPath)
@click.option("--checkpoint", type=ExistingPath, required=True)
@click.option("--out", type=PathArg, required=True, help="Index directory.")
@click.option(
    "--features-dir",
    type=ExistingPath,
    default=None,
    help="classify-archive --features output to reuse.",
)
@click.option(
    "--station", default=None, help="Station name or YAML (default: SET/calib/station.yaml, yrs)."
)
@click.option("--dark-dir", type=ExistingPath, default=None, help="Dark frames chosen by date.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@device_option
def index(
    image_set: Path,
    checkpoint: Path,
    out: Path,
    features_dir: Path | None,
    station: str | None,
    dark_dir: Path | None,
    batch_size: int,
    device: str,
) -> None:
    """Build a retrieval index of FC7 features for SET (labelled set, archive, manifest, images,
    or a frame store of `preprocess --format zarr`)."""
    from pipeline.retrieval_index import build_index

    info = build_index(
        image_set, checkpoint, out, features_dir, station, dark_dir, batch_size, device
    )
    errs = f", {info['n_errors']} unreadable (_errors.parquet)" if info["n_errors"] else ""
    click.echo(f"indexed {info['count']} frames x {info['dim']} features{errs} -> {out}")


@cli.command()
@click.option("--index", "index_dir", type=ExistingPath, required=True)
@click.option(
    "--query", multiple=True, type=ExistingPath, help="Query image or folder (repeatable)."
)
@click.option(
    "--evaluate", "query_set", type=ExistingPath, default=None, help="Labelled query set."
)
@click.option("--k", type=click.IntRange(1), default=20, show_default=True)
@click.option(
    "--ranks",
    default=None,
    help="Ranks to report, e.g. 1,5,10 (default: the paper's 1,3,5,8,10,15,20 up to --k).",
)
@click.option(
    "--out", type=PathArg, default=Path("retrieval"), show_default=True, help="Output folder."
)
@click.option(
    "--checkpoint",
    type=ExistingPath,
    default=None,
    help="Checkpoint for the query features (default: the index's own).",
)
@click.option("--station", default=None, help="Station of the query images (default: index's).")
@click.option(
    "--metric",
    type=click.Choice(["euclidean", "cosine"]),
    default="euclidean",
    show_default=True,
    help="Distance between FC7 vectors (the paper: euclidean).",
)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@device_option
def retrieve(
    index_dir: Path,
    query: tuple[Path, ...],
    query_set: Path | None,
    k: int,
    ranks: str | None,
    out: Path,
    checkpoint: Path | None,
    station: str | None,
    metric: str,
    batch_size: int,
    device: str,
) -> None:
    """Nearest neighbours of query images in an index, or precision@k of a labelled query set."""
    from pipeline.retrieval_eval import evaluate_retrieval
    from pipeline.retrieval_query import retrieve as run_retrieve

    if bool(query) == (query_set is not None):
        raise InputError("give either --query IMAGE (repeatable) or --evaluate QUERY_SET")
    if query_set is not None:
        res = evaluate_retrieval(
            index_dir,
            query_set,
            out,
            k,
            ranks,
            checkpoint,
            station,
            batch_size,
            device,
            metric=metric,
        )
        overall = res["scores"][-1]
        click.echo(
            f"{res['n_queries']} queries: mAP@{res['k']} {overall['map']:.3f}, "
            f"P@1 {overall.get('p@1', float('nan')):.3f} -> {out}/retrieval_eval.md"
        )
        return
    table = run_retrieve(
        index_dir, query, out, k, ranks, checkpoint, station, batch_size, device, metric=metric
    )
    click.echo(
        f"{table['query'].nunique()} queries x {int(table['rank'].max())} neighbours -> "
        f"{out}/neighbours.parquet, {out}/retrieval.png"
    )


# ------------------------------------------------------------------------------ run
@cli.command()
@click.argument("workflow", type=ExistingPath)
@click.option("--scheduler", default=None)
@click.option("--from", "from_stage", default=None)
@click.option("--only", default=None)
@click.option("--dry-run", is_flag=True)
@click.option("--set", "overrides", multiple=True, help="Variable override, e.g. --set out=demo.")
def run(
    workflow: Path,
    scheduler: str | None,
    from_stage: str | None,
    only: str | None,
    dry_run: bool,
    overrides: tuple[str, ...],
) -> None:
    """Run a workflow: its stages in order, skipping those that are up to date."""
    from pipeline.workflow import main_run

    main_run(cli, workflow, scheduler, from_stage, only, dry_run, overrides)


def main(args: list[str] | None = None) -> None:
    """Console entry point: user mistakes become one line on stderr, exit code 1."""
    try:
        cli.main(args=args, prog_name="aurora-pipeline", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        # one line, like every other user mistake; click's exit code 2 for usage stays
        where = exc.ctx.command_path if exc.ctx is not None else "aurora-pipeline"
        click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except AuroraError as exc:
        msg = str(exc).strip()
        if "Traceback" in msg:  # re-raised from a worker process: its last line is the error
            msg = msg.splitlines()[-1].split("Error: ", 1)[-1]
        click.echo(f"error: {msg}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        # The filesystem or the network refused a path or address the user gave.
        click.echo(f"error: {os_error_message(exc)}", err=True)
        sys.exit(1)


def os_error_message(exc: OSError) -> str:
    """One line for an OSError: the path, what the system said, and what to do."""
    hint = {
        FileExistsError: "a file is in the way where a folder is written; choose another --out",
        NotADirectoryError: "a file is in the way where a folder is written; choose another --out",
        IsADirectoryError: "a folder is in the way where a file is written",
        PermissionError: "no permission: choose a folder you can write to",
    }.get(type(exc))
    where = exc.filename if exc.filename is not None else None
    text = exc.strerror or str(exc) or type(exc).__name__
    line = f"{where}: {text}" if where is not None else text
    return f"{line} ({hint})" if hint else line


if __name__ == "__main__":  # `python -m pipeline.cli ...`, like `python -m pipeline ...`
    main()

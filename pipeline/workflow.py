"""The ``run`` command's stage runner: ordered stages, skipped if up to date, resumable, locked."""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import hashlib
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from pipeline.cluster import dask_client
from pipeline.config import from_dict, load_yaml
from pipeline.errors import AuroraError, ConfigError
from pipeline.output_folder import OutputFolder, refuse_foreign_out
from pipeline.report import write_report
from pipeline.storage import atomic_path, exclusive_lock

log = logging.getLogger(__name__)

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class StageSpec:
    """One stage: a CLI command with its arguments, and the files it reads and writes."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    #: pass the workflow's Dask scheduler address as ``--scheduler``.
    scheduler: bool = False

    def validate(self) -> None:
        if not self.outputs:
            raise ValueError(
                f"stage {self.name!r} declares no outputs, so it could never be skipped"
            )


@dataclass(frozen=True)
class ReportSpec:
    """What the run report shows: figures (PNG), tables (Markdown) and metrics (JSON) by path."""

    path: str = ""
    title: str = ""
    figures: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()


@dataclass(frozen=True)
class Workflow:
    """A workflow file: variables, ordered stages and an optional report."""

    name: str
    stages: tuple[StageSpec, ...]
    description: str = ""
    vars: dict[str, Any] = field(default_factory=dict)
    report: ReportSpec | None = None

    def validate(self) -> None:
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dup)}")
        if not self.stages:
            raise ValueError("a workflow needs at least one stage")

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]


# ---------------------------------------------------------------------------- loading


def _substitute(value: Any, variables: dict[str, Any], where: str) -> Any:
    """Replace ``${var}`` recursively; an unknown variable names the key that uses it."""
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in variables:
                known = ", ".join(sorted(variables)) or "none"
                raise ConfigError(
                    f"{where}: unknown variable ${{{name}}}; defined variables: {known}"
                )
            if variables[name] is None:
                # str(None) would put a folder called "None" into the path.
                raise ConfigError(
                    f"{where}: variable ${{{name}}} has no value (null); give it one in vars "
                    f"or with --set {name}=VALUE"
                )
            return str(variables[name])

        full = _VAR.fullmatch(value)
        if full and full.group(1) in variables and not isinstance(variables[full.group(1)], str):
            return variables[full.group(1)]  # keep numbers and booleans typed
        return _VAR.sub(repl, value)
    if isinstance(value, list):
        return [_substitute(v, variables, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        sep = " " if where.endswith(":") else "."
        return {k: _substitute(v, variables, f"{where}{sep}{k}") for k, v in value.items()}
    return value


def _references(value: Any) -> list[str]:
    """The variable names a value refers to with ``${name}``, in order."""
    if isinstance(value, str):
        return _VAR.findall(value)
    if isinstance(value, list):
        return [n for v in value for n in _references(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _references(v)]
    return []


def _check_resolved(value: Any, where: str) -> None:
    """Refuse a ``${`` left after substitution: a misspelt reference would reach a command."""
    if isinstance(value, str):
        if "${" in value:
            raise ConfigError(
                f"{where}: {value!r} has an unresolved '${{': a reference is ${{name}} with a "
                "name of letters, digits and _"
            )
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_resolved(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        sep = " " if where.endswith(":") else "."
        for k, v in value.items():
            _check_resolved(v, f"{where}{sep}{k}")


def _resolve_vars(raw: dict[str, Any], overrides: dict[str, str], source: str) -> dict[str, Any]:
    """Variables of the file, overridden by ``--set``, resolved against each other."""
    variables: dict[str, Any] = dict(raw)
    unknown = sorted(set(overrides) - set(variables))
    if unknown:
        raise ConfigError(
            f"{source}: --set {unknown[0]}: the workflow has no variable {unknown[0]!r}; "
            f"variables: {', '.join(sorted(variables)) or 'none'}"
        )
    # An empty value turns "${out}/train" into "/train", at the filesystem root.
    for name, value in overrides.items():
        if not value.strip():
            raise ConfigError(
                f"{source}: --set {name}=: empty value; give {name} a value, or leave out the "
                f"--set to use the workflow's ({raw[name]!r})"
            )
    for name, value in raw.items():
        if name not in overrides and isinstance(value, str) and not value.strip():
            raise ConfigError(
                f"{source}: vars.{name} is empty; give it a value in the file or with "
                f"--set {name}=VALUE"
            )
    variables.update(overrides)
    resolved: dict[str, Any] = {}

    def resolve(name: str, chain: list[str]) -> None:
        # Depth first: a name met again on its own chain is a loop, which would otherwise
        # leave a literal "${name}" in the value.
        if name in resolved:
            return
        if name in chain:
            loop = chain[chain.index(name) :] + [name]
            raise ConfigError(
                f"{source}: vars: variables refer to each other in a loop: "
                + " -> ".join(loop)
                + "; give one of them a value of its own"
            )
        value = variables[name]
        for ref in _references(value):
            if ref in variables:
                resolve(ref, [*chain, name])
        where = f"{source}: vars.{name}"
        resolved[name] = _substitute(value, {**variables, **resolved}, where)
        _check_resolved(resolved[name], where)

    for name in variables:
        resolve(name, [])
    return resolved


def load_workflow(
    path: str | os.PathLike, commands: click.Group, overrides: dict[str, str] | None = None
) -> Workflow:
    """Read, substitute and validate a workflow file; errors name the file and the key."""
    source = str(path)
    data = load_yaml(path)
    raw_vars = data.get("vars") or {}
    if not isinstance(raw_vars, dict):
        raise ConfigError(f"{source}: vars: expected a mapping of names to values")
    variables = _resolve_vars(raw_vars, overrides or {}, source)
    body = {k: v for k, v in data.items() if k != "vars"}
    body = _substitute(body, variables, f"{source}:")
    _check_resolved(body, f"{source}:")
    stages = body.get("stages")
    if isinstance(stages, list):
        for i, st in enumerate(stages):
            if isinstance(st, dict) and isinstance(st.get("args"), list):
                st["args"] = [str(a) for a in st["args"]]
            if isinstance(st, dict):
                for key in ("inputs", "outputs"):
                    if isinstance(st.get(key), list):
                        st[key] = [str(a) for a in st[key]]
            _check_command(commands, st.get("command") if isinstance(st, dict) else None, source, i)
    wf = from_dict(Workflow, {**body, "vars": variables}, source)
    # Every stage's command line is checked now, so that a typo does not surface only when
    # its stage runs, after the earlier ones took their time.
    for i, stage in enumerate(wf.stages):
        _check_stage_argv(commands, stage, f"{source}: stage {stage.name!r} (stages[{i}])")
    return wf


def _check_command(commands: click.Group, command: Any, source: str, i: int) -> None:
    if not isinstance(command, str):
        return  # from_dict reports the missing or mistyped key
    group: Any = commands
    for word in command.split():
        sub = getattr(group, "commands", {}).get(word)
        if sub is None:
            allowed = ", ".join(sorted(getattr(group, "commands", {})))
            raise ConfigError(
                f"{source}: stages[{i}].command: unknown command {command!r}; allowed: {allowed}"
            )
        group = sub


def _click_command(commands: click.Group, command: str) -> click.Command:
    """The click command a stage's ``command`` names (already checked by _check_command)."""
    cmd: Any = commands
    for word in command.split():
        cmd = cmd.commands[word]
    return cmd


def _flag(key: str) -> str:
    """The command-line flag of an ``options`` key: ``shard_size`` and ``shard-size`` alike."""
    return key if key.startswith("-") else "--" + key.replace("_", "-")


def _given(value: Any) -> bool:
    """Whether the parser saw a value (click marks absent arguments with a sentinel)."""
    return isinstance(value, (str, bool)) or (isinstance(value, (list, tuple)) and bool(value))


def _parse_stage(
    commands: click.Group, stage: StageSpec, where: str
) -> tuple[click.Command, dict[str, Any]]:
    """The stage's command and the raw values of its parameters, by parameter name."""
    cmd = _click_command(commands, stage.command)
    ctx = click.Context(cmd, info_name=stage.command, resilient_parsing=True)
    argv = stage_argv(stage)[len(stage.command.split()) :]
    try:
        values, extra, _ = cmd.make_parser(ctx).parse_args(args=argv)
    except click.UsageError as exc:
        raise ConfigError(f"{where}: {stage.command}: {exc.format_message()}") from None
    if extra:
        raise ConfigError(
            f"{where}: {stage.command} got unexpected extra arguments: {shlex.join(extra)}"
        )
    return cmd, values


def _param_label(param: click.Parameter) -> str:
    """How a message names a parameter: its long flag, or an argument's metavar."""
    if isinstance(param, click.Argument):
        return param.metavar or (param.name or "").upper()
    longs = [o for o in param.opts if o.startswith("--")]
    return (longs or param.opts)[0]


def _check_stage_argv(commands: click.Group, stage: StageSpec, where: str) -> None:
    """Refuse unknown options, flags given a value, and missing required parameters."""
    cmd = _click_command(commands, stage.command)
    options = [p for p in cmd.params if isinstance(p, click.Option)]
    by_flag = {o: p for p in options for o in (*p.opts, *p.secondary_opts)}
    for key, value in stage.options.items():
        flag = _flag(str(key))
        param = by_flag.get(flag)
        if param is None:
            valid = sorted({_param_label(p) for p in options})
            close = difflib.get_close_matches(flag, valid, n=3, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            listed = ", ".join(close + [v for v in valid if v not in close])
            raise ConfigError(
                f"{where}: options.{key}: {stage.command} has no option {flag}{hint}; "
                f"its options: {listed}"
            )
        if param.is_flag and isinstance(value, str) and value.lower() in ("true", "false"):
            # a variable (--set features=true) substitutes text: read it as the flag's value
            value = stage.options[key] = value.lower() == "true"
        if param.is_flag and not isinstance(value, bool) and value is not None:
            raise ConfigError(
                f"{where}: options.{key}: {flag} is an on/off flag; give true or false, "
                f"not {value!r}"
            )
    if stage.scheduler and "--scheduler" not in by_flag:
        raise ConfigError(
            f"{where}: scheduler: true, but {stage.command} takes no --scheduler option"
        )
    _, values = _parse_stage(commands, stage, where)
    for param in cmd.params:
        if param.required and not param.envvar and not _given(values.get(param.name or "")):
            raise ConfigError(f"{where}: {stage.command} needs {_param_label(param)}")


def _path_values(value: Any) -> list[str]:
    """The strings of a parsed value (one, or several for ``multiple``/``nargs``)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _path_values(item)]
    return []


def _related(a: Path, b: Path) -> bool:
    """Whether one path is the other, or lies inside it."""
    return a == b or a in b.parents or b in a.parents


def check_input_paths(
    wf: Workflow,
    commands: click.Group,
    source: str,
    stages: Sequence[StageSpec] | None = None,
) -> None:
    """Refuse an input path of a stage that is missing and that no earlier stage writes."""
    check = {s.name for s in (wf.stages if stages is None else stages)}
    # What earlier stages write: their declared outputs and the paths they are given to
    # write (click.Path parameters that need not exist). An input inside one of these, or
    # holding one, is made by the run and cannot be checked now.
    written: list[Path] = []
    for i, stage in enumerate(wf.stages):
        where = f"{source}: stage {stage.name!r} (stages[{i}])"
        cmd, values = _parse_stage(commands, stage, where)
        inputs: list[tuple[click.Parameter, str]] = []
        outputs: list[str] = list(stage.outputs)
        for param in cmd.params:
            if not isinstance(param.type, click.Path):
                continue
            for v in _path_values(values.get(param.name or "")):
                if param.type.exists and not (v == "-" and param.type.allow_dash):
                    inputs.append((param, v))
                elif not param.type.exists:
                    outputs.append(v)
        if stage.name in check:
            for param, v in inputs:
                p = Path(os.path.abspath(v))
                if p.exists() or any(_related(p, w) for w in written):
                    continue
                hint = (
                    f" (relative paths are resolved against the current folder, {Path.cwd()}: "
                    "run from the repository root or use absolute paths)"
                    if not Path(v).is_absolute()
                    else ""
                )
                raise ConfigError(
                    f"{where}: {_param_label(param)} {v}: no such file or folder, "
                    f"and no earlier stage writes it{hint}"
                )
        written += [Path(os.path.abspath(o)) for o in outputs]


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``--set key=value`` pairs as a dict; a malformed one is a ConfigError."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected NAME=VALUE")
        out[key.strip()] = value
    return out


# ---------------------------------------------------------------------------- stage argv


def stage_argv(stage: StageSpec, scheduler: str | None = None) -> list[str]:
    """The command line a stage runs (without the program name)."""
    argv = stage.command.split() + list(stage.args)
    for key, value in stage.options.items():
        flag = key if key.startswith("-") else "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    if stage.scheduler and scheduler:
        argv += ["--scheduler", scheduler]
    return argv


def _args_hash(stage: StageSpec) -> str:
    # The scheduler address changes per run and does not change results: leave it out.
    return hashlib.sha256(json.dumps(stage_argv(stage)).encode()).hexdigest()[:16]


def _mtime_newest(path: Path) -> float | None:
    """Newest modification time of a file, or of any file below a folder (None if missing)."""
    if not path.exists():
        return None
    if path.is_file():
        return path.stat().st_mtime
    newest = path.stat().st_mtime
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                else:
                    newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
    return newest


def _output_time(path: Path) -> float | None:
    """When an output was written: a file's mtime; a folder counts as its newest file's (stages
    that write folders also rewrite a summary file in them on every run)."""
    if not path.exists():
        return None
    if path.is_file():
        return path.stat().st_mtime
    return _mtime_newest(path)


def why_run(stage: StageSpec, state: dict[str, Any]) -> str | None:
    """Why ``stage`` must run, or None when its outputs are up to date."""
    rec = state.get("stages", {}).get(stage.name)
    if rec is None:
        return "never ran"
    if rec.get("args_hash") != _args_hash(stage):
        return "arguments changed"
    out_times = []
    for o in stage.outputs:
        t = _output_time(Path(o))
        if t is None:
            return f"output {o} is missing"
        out_times.append(t)
    oldest_out = min(out_times)
    for i in stage.inputs:
        t = _mtime_newest(Path(i))
        if t is None:
            return f"input {i} is missing"
        if t > oldest_out:
            return f"input {i} is newer than the outputs"
    return None


# ---------------------------------------------------------------------------- state and lock


def state_path(workflow_path: str | os.PathLike, wf: Workflow) -> Path:
    """The state file: in ``state_dir`` or ``out`` when the workflow defines one, else beside it."""
    base = Path(str(wf.vars.get("state_dir") or wf.vars.get("out") or Path(workflow_path).parent))
    return base / f".aurora-run-{wf.name}.json"


def read_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is unreadable; every stage will run", path)
        return {"stages": {}}


def write_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))


def run_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """An exclusive, non-blocking lock: two runs of one workflow never overlap."""
    return exclusive_lock(path, "another run of this workflow holds the lock")


# ---------------------------------------------------------------------------- running


class StageFailed(AuroraError):
    """A stage of a workflow failed; the next run resumes there."""


def _call_cli(commands: click.Group, argv: list[str]) -> None:
    """Run one CLI command in this process; any failure becomes StageFailed's cause."""
    try:
        commands.main(args=argv, prog_name="aurora-pipeline", standalone_mode=False)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"exited with code {exc.code}") from None


def select_stages(
    wf: Workflow, from_stage: str | None, only: str | None
) -> list[tuple[StageSpec, bool]]:
    """The stages to consider, each with whether it is forced to run (--from, --only)."""
    names = wf.stage_names()
    for opt, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in names:
            raise ConfigError(f"{opt} {value}: no such stage; stages: {', '.join(names)}")
    if only is not None:
        return [(s, True) for s in wf.stages if s.name == only]
    start = names.index(from_stage) if from_stage else 0
    return [
        (s, from_stage is not None and i >= start) for i, s in enumerate(wf.stages) if i >= start
    ]


@contextlib.contextmanager
def _workflow_scheduler(wf: Workflow, scheduler: str | None, needed: bool) -> Iterator[str | None]:
    """The scheduler address for stages that take one: the given one, or one LocalCluster."""
    if scheduler or not needed:
        yield scheduler
        return
    workers = wf.vars.get("workers")
    try:
        n = int(workers) if workers not in (None, "") else None
    except (TypeError, ValueError):
        raise ConfigError(f"variable workers: expected a whole number, got {workers!r}") from None
    with dask_client(workers=n) as client:
        yield client.scheduler.address


def run_workflow(
    path: str | os.PathLike,
    commands: click.Group,
    scheduler: str | None = None,
    from_stage: str | None = None,
    only: str | None = None,
    dry_run: bool = False,
    overrides: dict[str, str] | None = None,
    echo: Any = print,
) -> dict[str, Any]:
    """Run a workflow file with the stage ``commands`` (the CLI's group); returns
    {stage: "ran" | "skipped: why" | "would run: why"}."""
    wf = load_workflow(path, commands, overrides)
    chosen = select_stages(wf, from_stage, only)
    check_input_paths(wf, commands, str(path), [s for s, _ in chosen])
    spath = state_path(path, wf)
    state = read_state(spath)
    plan = [(s, "forced by --from/--only" if f else why_run(s, state)) for s, f in chosen]
    if dry_run:
        return _dry_run(plan, echo)
    outcome: dict[str, Any] = {}
    needs_cluster = any(reason and stage.scheduler for stage, reason in plan)
    if "out" in wf.vars:  # before the lock file appears in it
        refuse_foreign_out(Path(str(wf.vars["out"])), "run", owns=RUN_OWNS)
    with run_lock(spath.with_suffix(".lock")), _run_folder(wf) as folder:
        state = read_state(spath)  # what a run that held the lock before us recorded
        state.setdefault("stages", {})
        t_run = time.perf_counter()
        with _workflow_scheduler(wf, scheduler, needs_cluster) as address:
            for stage, forced in chosen:
                reason = "forced by --from/--only" if forced else why_run(stage, state)
                if reason is None:
                    outcome[stage.name] = "skipped: up to date"
                    echo(f"[{stage.name}] up to date, skipped")
                    continue
                _run_stage(commands, stage, reason, address, state, spath, str(path), echo)
                outcome[stage.name] = "ran"
        state["last_run_utc"] = dt.datetime.now(dt.timezone.utc).isoformat()
        state["last_run_seconds"] = round(time.perf_counter() - t_run, 2)
        write_state(spath, state)
        if folder is not None:
            folder.finish(stages=outcome)
    if wf.report is not None:
        report_path = Path(wf.report.path or f"results/{wf.name}/report.html")
        write_report(wf, state, report_path)
        echo(f"report: {report_path}")
    if "out" in wf.vars:
        echo(f"outputs: {Path(str(wf.vars['out'])).resolve()}")
    return outcome


#: What a workflow's ``out`` folder may hold besides its stages' folders: scan's manifest.
RUN_OWNS = ("manifest.parquet",)


@contextlib.contextmanager
def _run_folder(wf: Workflow) -> Iterator[OutputFolder | None]:
    """The workflow's ``out`` folder under the output-folder protocol (None without ``out``).

    Its ``_run.json`` says ``finished: true`` only after every chosen stage ran or was skipped.
    """
    if "out" not in wf.vars:
        yield None
        return
    out = Path(str(wf.vars["out"]))
    with OutputFolder(out, "run", {"workflow": wf.name}, owns=RUN_OWNS) as folder:
        folder.begin()
        yield folder


def _dry_run(plan: list[tuple[StageSpec, str | None]], echo: Any) -> dict[str, Any]:
    """Say what a run would do, stage by stage, without running anything."""
    outcome: dict[str, Any] = {}
    for stage, reason in plan:
        line = f"would run: {reason}" if reason else "up to date, would skip"
        outcome[stage.name] = line
        echo(f"[{stage.name}] {line}\n    aurora-pipeline {shlex.join(stage_argv(stage))}")
    return outcome


def _run_stage(
    commands: click.Group,
    stage: StageSpec,
    reason: str,
    address: str | None,
    state: dict[str, Any],
    spath: Path,
    source: str,
    echo: Any,
) -> None:
    """Run one stage and record it in the state file (or record where to resume)."""
    argv = stage_argv(stage, address)
    echo(f"[{stage.name}] running ({reason}): aurora-pipeline {shlex.join(argv)}")
    t0 = time.perf_counter()
    try:
        _call_cli(commands, argv)
    except (KeyboardInterrupt, click.exceptions.Abort):
        # Ctrl-C (click turns it into Abort, a RuntimeError) is no stage failure: let the CLI
        # report the interruption, but record that the stage did not finish, so that the next
        # run resumes there.
        _record_failure(state, spath, stage)
        echo(f"[{stage.name}] interrupted; rerun to resume from it")
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the stage named
        _record_failure(state, spath, stage)
        why = str(exc).strip() or type(exc).__name__  # some errors have no message
        raise StageFailed(
            f"{source}: stage {stage.name!r} failed: {why}; rerun to resume from it"
        ) from exc
    seconds = time.perf_counter() - t0
    state["stages"][stage.name] = {
        "args_hash": _args_hash(stage),
        "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
        "seconds": round(seconds, 2),
    }
    state.pop("failed", None)
    write_state(spath, state)
    echo(f"[{stage.name}] done in {seconds:.1f} s")


def _record_failure(state: dict[str, Any], spath: Path, stage: StageSpec) -> None:
    state["stages"].pop(stage.name, None)
    state["failed"] = stage.name
    write_state(spath, state)


def main_run(
    commands: click.Group,
    workflow: Path,
    scheduler: str | None,
    from_stage: str | None,
    only: str | None,
    dry_run: bool,
    overrides: Sequence[str],
) -> None:
    """CLI wrapper of run_workflow."""
    run_workflow(
        workflow,
        commands,
        scheduler=scheduler,
        from_stage=from_stage,
        only=only,
        dry_run=dry_run,
        overrides=parse_overrides(overrides),
        echo=lambda s: print(s, file=sys.stderr if not dry_run else sys.stdout),
    )


__all__ = [
    "ReportSpec",
    "StageFailed",
    "StageSpec",
    "Workflow",
    "check_input_paths",
    "load_workflow",
    "run_workflow",
    "stage_argv",
    "why_run",
]

import json
import os
import time
from pathlib import Path

import click
import pytest
import yaml

from pipeline import workflow as wfmod
from pipeline.cli import cli
from pipeline.errors import ConfigError, InputError
from pipeline.workflow import StageFailed, load_workflow, run_workflow, stage_argv


@pytest.fixture
def fake_cli(monkeypatch, tmp_path):
    """Stand in for the stage commands: ``scan IN -o OUT`` copies IN to OUT, recording each call."""
    calls: list[list[str]] = []

    def fake(commands, argv: list[str]) -> None:
        calls.append(argv)
        if (tmp_path / "fail").exists() and argv[1].endswith("b.txt"):
            raise RuntimeError("boom")
        src, out = Path(argv[1]), Path(argv[argv.index("--out") + 1])
        out.write_text(src.read_text() + "+")

    monkeypatch.setattr(wfmod, "_call_cli", fake)
    return calls


def _chain(tmp_path: Path, extra_vars: dict | None = None) -> Path:
    (tmp_path / "a.txt").write_text("a")
    doc = {
        "name": "chain",
        "vars": {"d": str(tmp_path), "out": str(tmp_path), **(extra_vars or {})},
        "stages": [
            {
                "name": n,
                "command": "scan",
                "args": [f"${{d}}/{i}.txt"],
                "options": {"out": f"${{d}}/{o}.txt"},
                "inputs": [f"${{d}}/{i}.txt"],
                "outputs": [f"${{d}}/{o}.txt"],
            }
            for n, i, o in [("first", "a", "b"), ("second", "b", "c"), ("third", "c", "d")]
        ],
    }
    p = tmp_path / "chain.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _ran(outcome: dict) -> list[str]:
    return [k for k, v in outcome.items() if v == "ran"]


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_stages_run_then_skip_and_touch_reruns_only_downstream(tmp_path, fake_cli):
    wf = _chain(tmp_path)
    assert _ran(run_workflow(wf, cli, echo=lambda s: None)) == ["first", "second", "third"]
    assert (tmp_path / "d.txt").read_text() == "a+++"
    assert _ran(run_workflow(wf, cli, echo=lambda s: None)) == []
    for name in "abcd":  # make the chain's files strictly ordered in time, then touch the middle
        _age(tmp_path / f"{name}.txt", 100 - "abcd".index(name))
    (tmp_path / "b.txt").touch()
    assert _ran(run_workflow(wf, cli, echo=lambda s: None)) == ["second", "third"]


def test_changed_arguments_rerun_the_stage(tmp_path, fake_cli):
    wf = _chain(tmp_path, {"tag": "x"})
    run_workflow(wf, cli, echo=lambda s: None)
    text = wf.read_text().replace("${d}/d.txt", "${d}/d2.txt")
    wf.write_text(text)
    assert _ran(run_workflow(wf, cli, echo=lambda s: None)) == ["third"]


def test_failed_stage_stops_and_rerun_resumes_there(tmp_path, fake_cli):
    wf = _chain(tmp_path)
    (tmp_path / "fail").touch()
    with pytest.raises(StageFailed, match="stage 'second' failed: boom"):
        run_workflow(wf, cli, echo=lambda s: None)
    assert not (tmp_path / "d.txt").exists()
    (tmp_path / "fail").unlink()
    assert _ran(run_workflow(wf, cli, echo=lambda s: None)) == ["second", "third"]


def test_run_says_where_the_outputs_are(tmp_path, fake_cli):
    lines: list[str] = []
    run_workflow(_chain(tmp_path), cli, echo=lines.append)
    assert lines[-1] == f"outputs: {tmp_path.resolve()}"


def test_dry_run_runs_nothing_and_says_why(tmp_path, fake_cli):
    wf = _chain(tmp_path)
    lines: list[str] = []
    outcome = run_workflow(wf, cli, dry_run=True, echo=lines.append)
    assert fake_cli == []
    assert outcome["first"] == "would run: never ran"
    assert any("aurora-pipeline scan" in ln for ln in lines)


def test_from_and_only_force_stages(tmp_path, fake_cli):
    wf = _chain(tmp_path)
    run_workflow(wf, cli, echo=lambda s: None)
    assert _ran(run_workflow(wf, cli, from_stage="second", echo=lambda s: None)) == [
        "second",
        "third",
    ]
    assert _ran(run_workflow(wf, cli, only="first", echo=lambda s: None)) == ["first"]
    with pytest.raises(ConfigError, match="--only nope: no such stage; stages: first, second"):
        run_workflow(wf, cli, only="nope", echo=lambda s: None)


def test_variables_and_overrides(tmp_path):
    wf = load_workflow(_chain(tmp_path), cli, {"d": "/elsewhere"})
    assert wf.stages[0].args == ("/elsewhere/a.txt",)
    assert stage_argv(wf.stages[0]) == ["scan", "/elsewhere/a.txt", "--out", "/elsewhere/b.txt"]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda d: d["stages"][0]["args"].append("${nope}"),
            r"chain\.yaml: .*args\[1\]: unknown variable \$\{nope\}",
        ),
        (
            lambda d: d["stages"][1].update(command="clasify"),
            r"stages\[1\]\.command: unknown command 'clasify'; allowed: .*classify-archive",
        ),
        (
            lambda d: d["stages"][2].update(outputz=[]),
            r"chain\.yaml: stages\[2\]: unknown key 'outputz'",
        ),
        (
            lambda d: d["stages"].append(dict(d["stages"][0])),
            r"stage names must be unique; repeated: first",
        ),
        (
            lambda d: d["stages"][1]["options"].update(outt="x"),
            r"chain\.yaml: stage 'second' \(stages\[1\]\): options\.outt: scan has no option "
            r"--outt \(did you mean --out\?\); its options: --out, --errors, --exclude, --station$",
        ),
        (
            lambda d: d["stages"][0].update(args=[]),
            r"stage 'first' \(stages\[0\]\): scan needs ARCHIVE",
        ),
        (
            lambda d: d["stages"][0]["args"].append("extra"),
            r"stage 'first' .*: scan got unexpected extra arguments: extra",
        ),
        (
            lambda d: d["stages"][0].update(scheduler=True),
            r"stage 'first' .*: scheduler: true, but scan takes no --scheduler option",
        ),
    ],
)
def test_validation_errors_name_the_file_and_key(tmp_path, mutate, match):
    p = _chain(tmp_path)
    doc = yaml.safe_load(p.read_text())
    mutate(doc)
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=match):
        load_workflow(p, cli)


def test_stage_option_typo_is_refused_before_any_stage_runs(tmp_path, fake_cli):
    doc = yaml.safe_load(Path("workflows/demo.yaml").read_text())
    classify = next(s for s in doc["stages"] if s["name"] == "classify")
    classify["options"]["shardsize"] = 50
    p = tmp_path / "demo.yaml"
    p.write_text(yaml.safe_dump(doc))
    want = (
        r"demo\.yaml: stage 'classify' \(stages\[7\]\): options\.shardsize: classify-archive "
        r"has no option --shardsize \(did you mean --shard-size\?\); its options: --shard-size, "
        r".*--batch-size"
    )
    for dry_run in (True, False):
        with pytest.raises(ConfigError, match=want):
            run_workflow(p, cli, dry_run=dry_run, overrides={"out": str(tmp_path)}, echo=print)
    assert fake_cli == []
    del classify["options"]["shardsize"]
    classify["options"]["features"] = "yes"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"--features is an on/off flag; give true or false"):
        load_workflow(p, cli)
    # a variable substitutes text: --set feats=false switches the flag off, true on
    doc["vars"]["feats"] = "true"
    classify["options"]["features"] = "${feats}"
    p.write_text(yaml.safe_dump(doc))
    for text, on in (("false", False), ("true", True)):
        wf = load_workflow(p, cli, overrides={"feats": text})
        stage = next(s for s in wf.stages if s.name == "classify")
        assert ("--features" in stage_argv(stage)) is on


@pytest.mark.parametrize(
    ("overrides", "extra_vars", "match"),
    [
        ({"d": ""}, {}, r"chain\.yaml: --set d=: empty value; give d a value, or leave out"),
        ({"d": "  "}, {}, r"--set d=: empty value"),
        ({}, {"out": ""}, r"chain\.yaml: vars\.out is empty; give it a value .* --set out=VALUE"),
        ({}, {"e": None, "out": "${e}/x"}, r"vars\.out: variable \$\{e\} has no value \(null\)"),
    ],
)
def test_empty_variables_are_refused(tmp_path, overrides, extra_vars, match):
    with pytest.raises(ConfigError, match=match):
        load_workflow(_chain(tmp_path, extra_vars), cli, overrides)


@pytest.mark.parametrize(
    ("extra_vars", "match"),
    [
        ({"a": "${b}", "b": "${a}"}, r"vars: variables refer to each other in a loop: a -> b -> a"),
        ({"a": "x/${a}"}, r"in a loop: a -> a;"),
        ({"a": "${c}", "b": "${a}", "c": "${b}/x"}, r"in a loop: a -> c -> b -> a;"),
        ({"a": "${ d}"}, r"vars\.a: '\$\{ d\}' has an unresolved '\$\{'"),
    ],
)
def test_variable_loops_and_unresolved_references_are_refused(tmp_path, extra_vars, match):
    with pytest.raises(ConfigError, match=match):
        load_workflow(_chain(tmp_path, extra_vars), cli)


def test_variables_may_refer_to_variables_in_any_order(tmp_path):
    wf = load_workflow(_chain(tmp_path, {"x": "${y}/x", "y": "${d}/y", "n": "${k}", "k": 3}), cli)
    assert wf.vars["x"] == f"{tmp_path}/y/x"
    assert wf.vars["n"] == 3


def test_unresolved_reference_in_a_stage_is_refused(tmp_path):
    p = _chain(tmp_path)
    p.write_text(p.read_text().replace("${d}/d.txt", "${d/d.txt"))
    with pytest.raises(ConfigError, match=r"stages\[2\]\.options\.out: .* unresolved '\$\{'"):
        load_workflow(p, cli)


def test_missing_input_path_is_refused_before_any_stage_runs(tmp_path, fake_cli, monkeypatch):
    p = _chain(tmp_path)
    doc = yaml.safe_load(p.read_text())
    doc["stages"][0]["args"] = ["a.txt"]  # relative: resolved against the current folder
    doc["stages"][1]["options"]["out"] = f"{tmp_path}/made/c.txt"
    doc["stages"][1]["outputs"] = [f"{tmp_path}/made/c.txt"]
    doc["stages"][2]["args"] = [f"{tmp_path}/made"]  # a folder an earlier stage writes into
    p.write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(tmp_path)
    assert set(run_workflow(p, cli, dry_run=True, echo=lambda s: None)) == {
        "first",
        "second",
        "third",
    }
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for dry_run in (True, False):
        with pytest.raises(
            ConfigError,
            match=r"chain\.yaml: stage 'first' \(stages\[0\]\): ARCHIVE a\.txt: no such file or "
            r"folder, and no earlier stage writes it \(relative paths are resolved against the "
            r"current folder, .*elsewhere: run from the repository root or use absolute paths\)",
        ):
            run_workflow(p, cli, dry_run=dry_run, echo=lambda s: None)
    assert fake_cli == []
    # --only third: the folder it reads is still written by an earlier stage
    assert run_workflow(p, cli, only="third", dry_run=True, echo=lambda s: None)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, click.exceptions.Abort])
def test_interrupted_stage_propagates_and_rerun_resumes_there(tmp_path, monkeypatch, interrupt):
    calls: list[str] = []

    def fake(commands, argv: list[str]) -> None:
        calls.append(argv[1])
        if argv[1].endswith("b.txt") and calls.count(argv[1]) == 1:
            raise interrupt()
        Path(argv[argv.index("--out") + 1]).write_text("x")

    monkeypatch.setattr(wfmod, "_call_cli", fake)
    wf = _chain(tmp_path)
    lines: list[str] = []
    with pytest.raises(interrupt):
        run_workflow(wf, cli, echo=lines.append)
    assert lines[-1] == "[second] interrupted; rerun to resume from it"
    assert _ran(run_workflow(wf, cli, echo=lambda s: None)) == ["second", "third"]


def test_interrupt_in_the_cli_says_so_not_stage_failed(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    def fake(commands, argv: list[str]) -> None:
        raise click.exceptions.Abort()

    monkeypatch.setattr(wfmod, "_call_cli", fake)
    with pytest.raises(SystemExit) as exc:
        main(["run", str(_chain(tmp_path))])
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert "aborted" in err and "failed" not in err


def test_stage_failure_without_a_message_names_the_exception(tmp_path, monkeypatch):
    def fake(commands, argv: list[str]) -> None:
        raise ValueError()

    monkeypatch.setattr(wfmod, "_call_cli", fake)
    with pytest.raises(StageFailed, match=r"stage 'first' failed: ValueError; rerun to resume"):
        run_workflow(_chain(tmp_path), cli, echo=lambda s: None)


def test_unknown_override_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--set nope: the workflow has no variable 'nope'"):
        load_workflow(_chain(tmp_path), cli, {"nope": "1"})


def test_concurrent_runs_do_not_both_run(tmp_path, fake_cli):
    wf_path = _chain(tmp_path)
    wf = load_workflow(wf_path, cli)
    lock = wfmod.state_path(wf_path, wf).with_suffix(".lock")
    with wfmod.run_lock(lock):
        with pytest.raises(InputError, match="another run of this workflow holds the lock"):
            run_workflow(wf_path, cli, echo=lambda s: None)
    assert fake_cli == []
    assert _ran(run_workflow(wf_path, cli, echo=lambda s: None)) == ["first", "second", "third"]


def test_scheduler_address_reaches_the_stages(tmp_path, monkeypatch):
    from distributed import Client, LocalCluster

    seen = []

    def fake(commands, argv):
        addr = argv[argv.index("--scheduler") + 1]
        with Client(addr) as c:
            seen.append(len(c.scheduler_info()["workers"]))
        Path(argv[argv.index("--out") + 1]).write_text("x")

    monkeypatch.setattr(wfmod, "_call_cli", fake)
    p = tmp_path / "w.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "name": "sched",
                "vars": {"out": str(tmp_path)},
                "stages": [
                    {
                        "name": "s",
                        "command": "preprocess",
                        "args": [str(tmp_path)],
                        "options": {"out": str(tmp_path / "m.txt")},
                        "outputs": [str(tmp_path / "m.txt")],
                        "scheduler": True,
                    }
                ],
            }
        )
    )
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        run_workflow(p, cli, scheduler=cluster.scheduler_address, echo=lambda s: None)
    assert seen == [1]


def test_report_is_written_and_self_contained(tmp_path, fake_cli):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(tmp_path / "fig.png")
    (tmp_path / "t.md").write_text("# Table\n\n| class | acc |\n|---|---|\n| arc | 0.9 |\n")
    (tmp_path / "m.json").write_text('{"average": {"accuracy": 0.875}}')
    p = _chain(tmp_path)
    doc = yaml.safe_load(p.read_text())
    doc["report"] = {
        "path": str(tmp_path / "report.html"),
        "figures": [str(tmp_path / "fig.png"), str(tmp_path / "nofig.png")],
        "tables": [str(tmp_path / "t.md")],
        "metrics": [str(tmp_path / "m.json")],
    }
    p.write_text(yaml.safe_dump(doc))
    run_workflow(p, cli, echo=lambda s: None)
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert "<td>arc</td><td>0.9</td>" in page
    assert "average.accuracy" in page and "0.875" in page
    assert "figure not found" in page
    assert "<td>second</td>" in page


def test_report_renders_in_headless_chromium(tmp_path, fake_cli):
    import shutil
    import subprocess

    import numpy as np
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (.ci/run installs Debian's chromium)")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(range(10), range(10), color="tab:red")
    fig.savefig(tmp_path / "fig.png")
    p = _chain(tmp_path)
    doc = yaml.safe_load(p.read_text())
    doc["report"] = {"path": str(tmp_path / "report.html"), "figures": [str(tmp_path / "fig.png")]}
    p.write_text(yaml.safe_dump(doc))
    run_workflow(p, cli, echo=lambda s: None)
    shot = tmp_path / "shot.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1000,1400",
        f"--screenshot={shot}",
    ]
    subprocess.run(
        [chromium, *flags, (tmp_path / "report.html").as_uri()],
        timeout=120,
        check=False,
        capture_output=True,
    )
    assert shot.exists(), "chromium wrote no screenshot"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (img[..., 0] > 150) & (img[..., 1] < 100) & (img[..., 2] < 100)
    assert red.sum() > 500, "the embedded figure did not render"


def test_run_refuses_an_out_holding_another_stages_output(tmp_path, fake_cli):
    wf = _chain(tmp_path)
    (tmp_path / "_run.json").write_text('{"command": "train", "finished": true}')
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError, match=r"holds a checkpoint \(_run.json\); give `run`"):
        run_workflow(wf, cli, echo=lambda s: None)
    assert fake_cli == [] and sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_interrupted_run_leaves_its_record_unfinished(tmp_path, monkeypatch):
    wf = _chain(tmp_path)
    calls = []

    def fake(commands, argv):
        calls.append(argv)
        if len(calls) == 2:
            raise KeyboardInterrupt
        out = Path(argv[argv.index("--out") + 1])
        out.write_text(Path(argv[1]).read_text() + "+")

    monkeypatch.setattr(wfmod, "_call_cli", fake)
    with pytest.raises(KeyboardInterrupt):
        run_workflow(wf, cli, echo=lambda s: None)
    record = json.loads((tmp_path / "_run.json").read_text())
    assert record["command"] == "run" and record["finished"] is False
    monkeypatch.setattr(wfmod, "_call_cli", lambda commands, argv: fake(commands, argv))
    calls.append("past the interruption")
    run_workflow(wf, cli, echo=lambda s: None)
    record = json.loads((tmp_path / "_run.json").read_text())
    assert record["finished"] is True and record["stages"]["first"] == "skipped: up to date"

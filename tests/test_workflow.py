import os
import time
from pathlib import Path

import pytest
import yaml

from pipeline import workflow as wfmod
from pipeline.errors import ConfigError, InputError
from pipeline.workflow import StageFailed, load_workflow, run_workflow, stage_argv


@pytest.fixture
def fake_cli(monkeypatch, tmp_path):
    """Stand in for the stage commands: ``scan IN -o OUT`` copies IN to OUT, recording each call."""
    calls: list[list[str]] = []

    def fake(argv: list[str]) -> None:
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
    assert _ran(run_workflow(wf, echo=lambda s: None)) == ["first", "second", "third"]
    assert (tmp_path / "d.txt").read_text() == "a+++"
    assert _ran(run_workflow(wf, echo=lambda s: None)) == []
    for name in "abcd":  # make the chain's files strictly ordered in time, then touch the middle
        _age(tmp_path / f"{name}.txt", 100 - "abcd".index(name))
    (tmp_path / "b.txt").touch()
    assert _ran(run_workflow(wf, echo=lambda s: None)) == ["second", "third"]


def test_changed_arguments_rerun_the_stage(tmp_path, fake_cli):
    wf = _chain(tmp_path, {"tag": "x"})
    run_workflow(wf, echo=lambda s: None)
    text = wf.read_text().replace("${d}/d.txt", "${d}/d2.txt")
    wf.write_text(text)
    assert _ran(run_workflow(wf, echo=lambda s: None)) == ["third"]


def test_failed_stage_stops_and_rerun_resumes_there(tmp_path, fake_cli):
    wf = _chain(tmp_path)
    (tmp_path / "fail").touch()
    with pytest.raises(StageFailed, match="stage 'second' failed: boom"):
        run_workflow(wf, echo=lambda s: None)
    assert not (tmp_path / "d.txt").exists()
    (tmp_path / "fail").unlink()
    assert _ran(run_workflow(wf, echo=lambda s: None)) == ["second", "third"]


def test_run_says_where_the_outputs_are(tmp_path, fake_cli):
    lines: list[str] = []
    run_workflow(_chain(tmp_path), echo=lines.append)
    assert lines[-1] == f"outputs: {tmp_path.resolve()}"


def test_dry_run_runs_nothing_and_says_why(tmp_path, fake_cli):
    wf = _chain(tmp_path)
    lines: list[str] = []
    outcome = run_workflow(wf, dry_run=True, echo=lines.append)
    assert fake_cli == []
    assert outcome["first"] == "would run: never ran"
    assert any("aurora-pipeline scan" in ln for ln in lines)


def test_from_and_only_force_stages(tmp_path, fake_cli):
    wf = _chain(tmp_path)
    run_workflow(wf, echo=lambda s: None)
    assert _ran(run_workflow(wf, from_stage="second", echo=lambda s: None)) == ["second", "third"]
    assert _ran(run_workflow(wf, only="first", echo=lambda s: None)) == ["first"]
    with pytest.raises(ConfigError, match="--only nope: no such stage; stages: first, second"):
        run_workflow(wf, only="nope", echo=lambda s: None)


def test_variables_and_overrides(tmp_path):
    wf = load_workflow(_chain(tmp_path), {"d": "/elsewhere"})
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
    ],
)
def test_validation_errors_name_the_file_and_key(tmp_path, mutate, match):
    p = _chain(tmp_path)
    doc = yaml.safe_load(p.read_text())
    mutate(doc)
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=match):
        load_workflow(p)


def test_unknown_override_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--set nope: the workflow has no variable 'nope'"):
        load_workflow(_chain(tmp_path), {"nope": "1"})


def test_concurrent_runs_do_not_both_run(tmp_path, fake_cli):
    wf_path = _chain(tmp_path)
    wf = load_workflow(wf_path)
    lock = wfmod.state_path(wf_path, wf).with_suffix(".lock")
    with wfmod.run_lock(lock):
        with pytest.raises(InputError, match="another run of this workflow holds the lock"):
            run_workflow(wf_path, echo=lambda s: None)
    assert fake_cli == []
    assert _ran(run_workflow(wf_path, echo=lambda s: None)) == ["first", "second", "third"]


def test_scheduler_address_reaches_the_stages(tmp_path, monkeypatch):
    from distributed import Client, LocalCluster

    seen = []

    def fake(argv):
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
                        "command": "scan",
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
        run_workflow(p, scheduler=cluster.scheduler_address, echo=lambda s: None)
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
    run_workflow(p, echo=lambda s: None)
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
    run_workflow(p, echo=lambda s: None)
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

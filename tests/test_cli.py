import pytest

from pipeline import __version__
from pipeline.cli import main


def test_version(capsys):
    main(["--version"])
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("module", ["pipeline", "pipeline.cli"])
def test_python_dash_m_runs_the_cli(module, tmp_path):
    """`python -m pipeline.cli` once imported the module and exited 0 having done nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    ok = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0 and __version__ in ok.stdout, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", module, "scan", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for cmd in [
        "scan",
        "synth",
        "preprocess",
        "train",
        "evaluate",
        "classify-archive",
        "occurrence",
        "index",
        "retrieve",
        "run",
    ]:
        assert cmd in out


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["scan", str(tmp_path), "--station", "nowhere", "-o", str(tmp_path / "m.parquet")])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_scan_unknown_station_is_one_line_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["scan", str(tmp_path), "--station", "nowhere", "-o", str(tmp_path / "m.parquet")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "unknown station" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.parquet").exists()


def test_error_reraised_from_a_worker_process_is_one_line(tmp_path, capsys):
    """torch's DataLoader re-raises a worker's FrameReadError as FrameReadError(traceback text)."""
    import torch.utils.data

    from pipeline.errors import FrameReadError

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise FrameReadError(tmp_path / "x.png", "truncated PNG")

    loader = torch.utils.data.DataLoader(Bad(), num_workers=1)
    with pytest.raises(FrameReadError) as exc:
        next(iter(loader))
    assert exc.value.path == str(tmp_path / "x.png")
    assert exc.value.reason == "truncated PNG"


def _one_line_error(capsys, args, code=1):
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == code, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


def test_click_usage_errors_are_one_line_with_where_to_look(tmp_path, capsys):
    err = _one_line_error(capsys, ["scan", str(tmp_path / "nope")], code=2)
    assert "does not exist" in err and "aurora-pipeline scan --help" in err
    err = _one_line_error(capsys, ["evaluate", "--device", "gpu0"], code=2)
    assert "use auto, cpu, cuda or cuda:N" in err


def test_device_accepts_cuda_n(tmp_path, capsys):
    """cuda:1 passes the option check; without a GPU it is resolve_device's clear error."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU")
    err = _one_line_error(
        capsys,
        [
            "index",
            str(tmp_path),
            "--checkpoint",
            str(tmp_path),
            "--device",
            "cuda:1",
            "--out",
            str(tmp_path / "o"),
        ],  # fmt: skip
    )
    assert "Invalid value" not in err


def test_a_file_where_an_output_folder_goes_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    err = _one_line_error(
        capsys, ["synth", "labelled", str(blocker / "set"), "--n", "2", "--size", "64"]
    )
    assert str(blocker) in err and "choose another --out" in err


def test_scan_finding_no_frame_names_the_station(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "20041201_0600.png").write_bytes(b"x")
    err = _one_line_error(capsys, ["scan", str(tmp_path / "a"), "-o", str(tmp_path / "m.parquet")])
    assert "no frames of station yrs" in err and "--station" in err
    assert not (tmp_path / "m.parquet").exists()


def test_occurrence_with_nothing_in_range_writes_nothing(tmp_path, capsys):
    import pandas as pd

    src = tmp_path / "pred.parquet"
    pd.DataFrame({"mlt": [1.0, 2.0], "label": ["arc", "arc"]}).to_parquet(src)
    err = _one_line_error(capsys, ["occurrence", str(src), "--out", str(tmp_path / "o")])
    assert "no frame to bin (2 outside 6-18 MLT" in err
    assert not (tmp_path / "o" / "occurrence.png").exists()

import pytest

from pipeline import __version__
from pipeline.cli import main


def test_version(capsys):
    main(["--version"])
    assert __version__ in capsys.readouterr().out


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

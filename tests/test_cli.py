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

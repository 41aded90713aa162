import os
import stat

import pandas as pd
import pytest

from pipeline.classes import CLASSES
from pipeline.storage import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    atomic_path,
    empty_frame,
    error_rows,
    merge_errors,
    predictions_metadata,
    read_contract,
    write_table,
)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_renames_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("done")
    assert target.read_text() == "done"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_merge_errors_keeps_one_row_per_frame_and_stage(tmp_path):
    p = tmp_path / "errors.parquet"
    merge_errors(p, error_rows([("a.png", 0), ("b.png", 0)], "classify", ValueError("bad")))
    both = merge_errors(p, error_rows([("a.png", 0)], "classify", OSError("worse")))
    assert len(both) == 2
    back = pd.read_parquet(p)
    assert list(back.columns) == ERRORS_SCHEMA.names
    assert back.set_index("path").loc["a.png", "error"] == "OSError"


def test_write_table_casts_to_schema(tmp_path):
    df = pd.DataFrame(
        {"path": ["x"], "frame": [3], "stage": ["s"], "error": ["E"], "message": ["m"]}
    )
    write_table(df, tmp_path / "e.parquet", ERRORS_SCHEMA)
    assert str(pd.read_parquet(tmp_path / "e.parquet")["frame"].dtype) == "int16"


def test_exclusive_lock_refuses_a_second_holder_and_leaves_no_stale_lock(tmp_path):
    from pipeline.errors import InputError
    from pipeline.storage import exclusive_lock

    lock = tmp_path / "x.lock"
    with exclusive_lock(lock, "busy"):
        with pytest.raises(InputError, match=r"busy \(lock .*x\.lock\)"):
            with exclusive_lock(lock, "busy"):
                pass
    with exclusive_lock(lock, "busy"):  # released on exit: taken again
        pass


def test_damaged_errors_table_is_a_clear_error(tmp_path):
    from pipeline.errors import InputError
    from pipeline.storage import read_errors

    assert read_errors(tmp_path / "absent.parquet").empty
    bad = tmp_path / "errors.parquet"
    bad.write_text("not parquet")
    with pytest.raises(InputError, match=r"errors\.parquet: unreadable errors table"):
        merge_errors(bad, error_rows([("a.png", 0)], "scan", ValueError("x")))


def test_writing_onto_a_folder_is_a_clear_error(tmp_path):
    from pipeline.errors import InputError

    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="is a folder; give the name of a file"):
        with atomic_path(tmp_path / "out"):
            pass


def test_contract_metadata_travels_beside_pandas_own(tmp_path):
    """Key-value metadata says what a table holds; pandas still gets its dtypes back."""
    df = empty_frame(PREDICTIONS_SCHEMA)
    p = write_table(df, tmp_path / "p.parquet", PREDICTIONS_SCHEMA, predictions_metadata(
        "yrs", "abc123", "aacgm"))  # fmt: skip
    contract = read_contract(p)
    assert contract["station"] == "yrs" and contract["model_id"] == "abc123"
    assert contract["mlt_method"] == "aacgm" and contract["contract"] == "1"
    units = {"mlt": "hours", **{f"p_{c}": "1" for c in CLASSES}, "sky_level": "1"}
    assert contract["units"] == units
    assert contract["long_names"]["frame"].startswith("frame index")
    back = pd.read_parquet(p)
    assert (
        str(back["time_utc"].dtype) == "datetime64[ns, UTC]" and back["label"].dtype == "category"
    )
    assert read_contract(write_table(df, tmp_path / "plain.parquet")) == {}

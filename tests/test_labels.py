"""The labels table reader (pipeline/labels.py): one reader, clear errors, no torch needed."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from pipeline.errors import InputError
from pipeline.labels import read_labels_table


def test_reads_the_table_and_names_a_missing_column(tmp_path):
    pd.DataFrame({"path": ["b.png", "a.png"], "label": ["arc", "radial"]}).to_parquet(
        tmp_path / "labels.parquet"
    )
    assert read_labels_table(tmp_path, ("path", "label"))["path"].tolist() == ["b.png", "a.png"]
    with pytest.raises(InputError, match=r"labels.parquet: missing column 'episode'"):
        read_labels_table(tmp_path, ("path", "episode"))


def test_a_missing_or_damaged_table_is_one_line(tmp_path):
    with pytest.raises(InputError, match="labels.parquet not found"):
        read_labels_table(tmp_path)
    (tmp_path / "labels.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="cannot read as Parquet"):
        read_labels_table(tmp_path)


def test_reading_labels_loads_no_torch():
    code = "import sys, pipeline.labels; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

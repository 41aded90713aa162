"""The labels table of a labelled set (``labels.parquet``): its name and its one reader.

A leaf module (pandas only), so that stages that do not load torch read it too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.errors import InputError

#: The labels table of a labelled set, inside its folder.
LABELS_NAME = "labels.parquet"


def read_labels_table(root: str | os.PathLike, required: Sequence[str] = ("path",)) -> pd.DataFrame:
    """ROOT/labels.parquet as it is on disk (index reset): the one reader of that file.

    A missing or undecodable table, or one without a ``required`` column, is an InputError.
    """
    table = Path(root) / LABELS_NAME
    if not table.is_file():
        raise InputError(
            f"{table}: labels.parquet not found; a labelled set is a folder written by "
            "`aurora-pipeline synth labelled` or `aurora-pipeline preprocess`"
        )
    try:
        df = pd.read_parquet(table)
    except Exception as exc:  # noqa: BLE001 - any decode failure is the user's file
        raise InputError(f"{table}: cannot read as Parquet ({exc})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(
            f"{table}: missing column {missing[0]!r}; labels.parquet needs path and label "
            "(time_utc and winter optional)"
        )
    return df.reset_index(drop=True)

"""The winter of a date: auroral seasons span a new year, so a winter is named by its December."""

from __future__ import annotations

from typing import overload

import pandas as pd


@overload
def winter_of(time: pd.Series) -> pd.Series: ...
@overload
def winter_of(time: pd.Timestamp | str) -> int: ...


def winter_of(time: pd.Series | pd.Timestamp | str) -> pd.Series | int:
    """The winter (the year of its December) a time belongs to: July..December -> that year,
    January..June -> the year before. A Series of times gives a nullable Int64 Series."""
    if isinstance(time, pd.Series):
        t = pd.to_datetime(time, utc=True)
        return (t.dt.year - (t.dt.month < 7).astype(int)).astype("Int64")
    t = pd.Timestamp(time)
    return int(t.year if t.month >= 7 else t.year - 1)

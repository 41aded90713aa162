"""The four dayside auroral classes and their order: the one place they are defined."""

from __future__ import annotations

#: Class order everywhere (index 0..3), docs/design.md section 4.
CLASSES: tuple[str, ...] = ("arc", "drapery", "radial", "hotspot")

#: Long names, for figures and tables.
CLASS_LONG_NAMES: dict[str, str] = {
    "arc": "arc",
    "drapery": "drapery corona",
    "radial": "radial corona",
    "hotspot": "hotspot corona",
}

#: Numeric codes of the expert label files (Alllabel2003_38044.txt): 1 = arc ... 4 = hotspot.
LABEL_CODES: dict[int, str] = {i + 1: c for i, c in enumerate(CLASSES)}

#: One colour per class for every figure (colour-blind safe Okabe-Ito, close to the paper's
#: Fig. 6 boxes: red arc, green drapery, yellow radial, blue hotspot).
CLASS_COLOURS: dict[str, str] = {
    "arc": "#D55E00",
    "drapery": "#009E73",
    "radial": "#E69F00",
    "hotspot": "#0072B2",
}

#: Probability columns of the predictions table.
PROB_COLUMNS: tuple[str, ...] = tuple(f"p_{c}" for c in CLASSES)

#: Class shares of the paper's training set ASI8K (2913/1771/1640/1676 frames).
ASI8K_COUNTS: dict[str, int] = {"arc": 2913, "drapery": 1771, "radial": 1640, "hotspot": 1676}


def class_index(name: str) -> int:
    """Index of a class name; raises ValueError naming the allowed classes."""
    try:
        return CLASSES.index(name)
    except ValueError:
        raise ValueError(f"unknown class {name!r}; allowed: {', '.join(CLASSES)}") from None

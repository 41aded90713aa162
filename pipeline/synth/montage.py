"""Inspection: the preprocessed look of a raw frame and a montage of the classes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pipeline.classes import CLASSES
from pipeline.synth.geometry import _station
from pipeline.synth.render import frame_rng, render_frame
from pipeline.synth.season import dark_frame, season_for


def quicklook(raw: np.ndarray, dark: np.ndarray | None, size: int | None = None) -> np.ndarray:
    """The preprocessed look (dark subtracted, 440 crop, stretch 0..4000 to 8 bit, r=220 mask)."""
    st = _station(raw.shape[0])
    x = raw.astype(np.float32) - (dark.astype(np.float32) if dark is not None else 0.0)
    half = st.crop_size // 2
    r0, c0 = (int(round(v)) for v in st.optical_centre)
    x = x[r0 - half : r0 - half + st.crop_size, c0 - half : c0 - half + st.crop_size]
    yy, xx = np.mgrid[: x.shape[0], : x.shape[1]]
    m = np.hypot(yy - (x.shape[0] - 1) / 2, xx - (x.shape[1] - 1) / 2) <= st.mask_radius
    y = np.clip(x / st.preprocess.stretch_high * 255.0, 0, 255) * m
    return y.astype(np.uint8)


def montage(
    out: str | os.PathLike,
    real_dir: str | os.PathLike | None = None,
    per_class: int = 4,
    seed: int = 7,
    size: int = 512,
    tile: int = 220,
) -> Path:
    """Save a PNG: synthetic frames of each class (rows) next to the real YRS examples."""

    rows = []
    real = []
    if real_dir is not None:
        real_dir = Path(real_dir)
        fig = {"arc": "demo_a", "drapery": "demo_D", "radial": "demo_R", "hotspot": "demo_HS"}
        for c in CLASSES:
            p = real_dir / "figures" / f"{fig[c]}.png"
            im = Image.open(p).convert("L")
            w, h = im.size
            real.append(im.crop((0, int(h * 0.06), w // 3 - 2, h)).resize((tile, tile)))
    time = pd.Timestamp("2004-01-05 09:00:00", tz="UTC")
    for ci, c in enumerate(CLASSES):
        tiles = []
        for j in range(per_class):
            rng = frame_rng(seed, 100 * ci + j)
            raw = render_frame(c, rng, size, season_for(2003), time=time, secondary=False)
            tiles.append(
                Image.fromarray(quicklook(raw, dark_frame(2003, size))).resize((tile, tile))
            )
        if real:
            tiles.append(real[ci])
        rows.append(tiles)
    jpgs = []
    if real_dir is not None:
        jpgs = [
            Image.open(p).convert("L").resize((tile, tile))
            for p in sorted(Path(real_dir).glob("*.jpg"))
        ]
    ncol = max(per_class + (1 if real else 0), len(jpgs))
    pad, lab = 4, 16
    W = ncol * (tile + pad) + pad + 70
    H = (len(rows) + (1 if jpgs else 0)) * (tile + pad + lab) + pad
    canvas = Image.new("L", (W, H), 255)
    draw = ImageDraw.Draw(canvas)
    for ri, tiles in enumerate(rows):
        y = pad + ri * (tile + pad + lab)
        draw.text((4, y + tile // 2), CLASSES[ri], fill=0)
        for ti, t in enumerate(tiles):
            x = 70 + pad + ti * (tile + pad)
            canvas.paste(t, (x, y + lab))
            name = "real (paper fig.)" if (real and ti == len(tiles) - 1) else f"synthetic {ti + 1}"
            draw.text((x, y + 2), name, fill=0)
    if jpgs:
        y = pad + len(rows) * (tile + pad + lab)
        draw.text((4, y + tile // 2), "real YRS", fill=0)
        for ti, t in enumerate(jpgs):
            x = 70 + pad + ti * (tile + pad)
            canvas.paste(t, (x, y + lab))
            draw.text((x, y + 2), "real jpg", fill=0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    return out

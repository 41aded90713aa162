"""Reading and writing frames: PNG, TIFF, JPEG, BMP (8/16-bit grey) and UCalgary PGM stacks.

Every reader returns a 2-D grey ``uint8`` or ``uint16`` array and turns every failure (missing,
empty, truncated, not an image, unsupported pixel mode, frame out of range) into one
:class:`~pipeline.errors.FrameReadError` naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import logging
import os
import re
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from pipeline.errors import FrameReadError, InputError
from pipeline.storage import atomic_path

log = logging.getLogger(__name__)

#: Suffixes handled by the PGM-stack reader (multi-frame, 16-bit big-endian; optionally gzipped).
PGM_SUFFIXES = (".pgm", ".pgm.gz")

# Pillow's plugin name for each suffix: opening with the expected format first skips the probing
# of every other plugin (the common case on the hot path); a mislabelled file falls back to probing.
_PIL_FORMATS = {
    ".png": "PNG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
}
_GREY16 = ("I;16", "I;16L", "I;16B", "I;16N")
_COLOUR = ("RGB", "RGBA", "RGBX", "LA", "La", "PA", "CMYK", "YCbCr", "LAB", "HSV")
_warned_colour = False


def _is_pgm(path: str) -> bool:
    return path.lower().endswith(PGM_SUFFIXES)


def _check_file(path: str) -> os.stat_result:
    """``os.stat`` of ``path``, or a FrameReadError for a missing, empty or non-regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FrameReadError(path, "file not found") from None
    except OSError as exc:
        raise FrameReadError(path, f"cannot open ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise FrameReadError(path, "is a directory, not a frame file")
    if st.st_size == 0:
        raise FrameReadError(path, "empty file (0 bytes)")
    return st


# ----------------------------------------------------------------------------- Pillow formats


def _warn_colour(path: str, mode: str) -> None:
    global _warned_colour
    if not _warned_colour:
        _warned_colour = True
        log.warning(
            "%s: colour frame (mode %s) converted to grey (ITU-R 601 luma); further colour frames "
            "are converted silently",
            path,
            mode,
        )


def _to_grey(im: Image.Image, path: str) -> np.ndarray:
    """The pixels of a decoded Pillow image as a 2-D grey uint8/uint16 array (writable)."""
    mode = im.mode
    if mode == "L":
        arr = np.asarray(im)
    elif mode in _GREY16:
        arr = np.asarray(im)
        if arr.dtype != np.uint16:  # big-endian I;16B: make it native
            arr = arr.astype(np.uint16)
    elif mode == "I":
        # 32-bit integer mode: what Pillow gives for some 16-bit TIFF/PNG writers; keep the values
        # when they fit in 16 bits, which is every camera this project knows.
        arr = np.asarray(im)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise FrameReadError(
                path, f"32-bit integer pixels outside 0..65535 ({lo}..{hi}); not a camera frame"
            )
        arr = arr.astype(np.uint16)
    elif mode == "1":
        arr = np.asarray(im.convert("L"))
    elif mode == "P":
        rgb = im.convert("RGB")
        arr3 = np.asarray(rgb)
        if (arr3[..., 0] == arr3[..., 1]).all() and (arr3[..., 0] == arr3[..., 2]).all():
            arr = arr3[..., 0]  # a grey palette: no information lost, no warning
        else:
            _warn_colour(path, mode)
            arr = np.asarray(rgb.convert("L"))
    elif mode in _COLOUR:
        _warn_colour(path, mode)
        arr = np.asarray(im.convert("L"))
    else:
        raise FrameReadError(
            path, f"unsupported pixel mode {mode!r} (need 8- or 16-bit grey, or RGB/RGBA)"
        )
    if arr.ndim != 2:
        raise FrameReadError(path, f"decoded to shape {arr.shape}, not a 2-D frame")
    if not arr.flags.writeable:
        arr = arr.copy()
    return arr


def _read_pillow(path: str, frame: int) -> np.ndarray:
    ext = os.path.splitext(path)[1].lower()
    fmt = _PIL_FORMATS.get(ext)
    try:
        try:
            im = Image.open(path, formats=[fmt] if fmt else None)
        except UnidentifiedImageError:
            if fmt is None:
                raise
            im = Image.open(path)  # mislabelled (a JPEG named .png): let Pillow probe
        with im:
            if frame:
                n = getattr(im, "n_frames", 1)
                if frame >= n:
                    raise FrameReadError(
                        path, f"frame {frame} out of range (the file holds {n} frame(s))"
                    )
                im.seek(frame)
            im.load()
            return _to_grey(im, path)
    except FrameReadError:
        raise
    except UnidentifiedImageError:
        raise FrameReadError(
            path, "not a recognised image (expected PNG, TIFF, JPEG, BMP or PGM)"
        ) from None
    except Image.DecompressionBombError as exc:
        raise FrameReadError(path, f"refused: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error, IndexError) as exc:
        # Pillow reports truncation and corrupt streams as OSError/SyntaxError/ValueError.
        raise FrameReadError(path, f"truncated or corrupt image data ({exc})") from None


# ----------------------------------------------------------------------------- PGM stacks

_WS = b" \t\r\n\v\f"
_KEY_RE = re.compile(rb'^#\s*"([^"]*)"\s*(.*?)\s*$')
_TIME_KEY = "image request start"


class _NeedMore(Exception):
    """The header runs past the bytes read so far."""


def _parse_pgm_header(buf: bytes, pos: int) -> tuple[dict[str, str], int, int, int, int]:
    """Parse one P5 header at ``buf[pos:]``: (comments, width, height, maxval, raster offset)."""
    if len(buf) - pos < 2:
        raise _NeedMore
    if buf[pos : pos + 2] != b"P5":
        raise ValueError(
            f"expected a 'P5' frame header at byte {pos}, found {buf[pos : pos + 2]!r}"
        )
    i = pos + 2
    n = len(buf)
    comments: dict[str, str] = {}
    values: list[int] = []
    while len(values) < 3:
        if i >= n:
            raise _NeedMore
        c = buf[i : i + 1]
        if c in (b" ", b"\t", b"\r", b"\n", b"\v", b"\f"):
            i += 1
        elif c == b"#":
            j = buf.find(b"\n", i)
            if j < 0:
                raise _NeedMore
            m = _KEY_RE.match(buf[i:j])
            if m:
                comments[m.group(1).decode("latin-1").strip().lower()] = m.group(2).decode(
                    "latin-1"
                )
            i = j + 1
        else:
            j = i
            while j < n and buf[j : j + 1].isdigit():
                j += 1
            if j >= n:
                raise _NeedMore
            if j == i or buf[j] not in _WS:
                raise ValueError(f"bad PGM header near byte {i}: {buf[i : i + 16]!r}")
            values.append(int(buf[i:j]))
            i = j
    # exactly one whitespace byte separates maxval from the raster
    if i >= n:
        raise _NeedMore
    w, h, maxval = values
    if w <= 0 or h <= 0 or not 0 < maxval < 65536:
        raise ValueError(f"bad PGM size or maxval ({w} x {h}, maxval {maxval})")
    return comments, w, h, maxval, i + 1


def _open_pgm(path: str) -> IO[bytes]:
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


class _PgmReader:
    """Forward-only reader over a (possibly gzipped) PGM stack.

    Never seeks backwards: a backward seek in a gzip stream restarts decompression from byte 0.
    """

    def __init__(self, f: IO[bytes], path: str) -> None:
        self.f = f
        self.path = path
        self.buf = b""
        self.consumed = 0

    def _fill(self, n: int) -> bool:
        more = self.f.read(max(n, 8192))
        self.buf += more
        return bool(more)

    def read(self, n: int) -> bytes:
        if len(self.buf) >= n:
            out, self.buf = self.buf[:n], self.buf[n:]
            return out
        out = self.buf + self.f.read(n - len(self.buf))
        self.buf = b""
        return out

    def skip(self, n: int) -> None:
        if len(self.buf) >= n:
            self.buf = self.buf[n:]
            return
        rest = n - len(self.buf)
        self.buf = b""
        self.f.seek(rest, os.SEEK_CUR)  # forward only: gzip decompresses and discards

    def frames(self) -> Iterator[tuple[dict[str, str], int, int, int, int]]:
        """Yield (comments, w, h, maxval, raster bytes) per frame; the caller may read it."""
        index = 0
        while True:
            if not self.buf.strip(_WS) and not self._fill(8192):
                if index == 0:
                    raise FrameReadError(self.path, "empty PGM stack (no frames)")
                return
            if not self.buf.strip(_WS):
                continue
            self.buf = self.buf.lstrip(_WS)
            while True:
                try:
                    comments, w, h, maxval, off = _parse_pgm_header(self.buf, 0)
                    break
                except _NeedMore:
                    if not self._fill(len(self.buf)):
                        raise FrameReadError(
                            self.path, f"truncated header of frame {index}"
                        ) from None
                except ValueError as exc:
                    raise FrameReadError(self.path, f"frame {index}: {exc}") from None
            self.buf = self.buf[off:]
            nbytes = w * h * (2 if maxval > 255 else 1)
            self.consumed = 0
            yield comments, w, h, maxval, nbytes
            if self.consumed < nbytes:
                self.skip(nbytes - self.consumed)
            index += 1

    def raster(self, index: int, w: int, h: int, maxval: int, nbytes: int) -> np.ndarray:
        data = self.read(nbytes)
        self.consumed = len(data)
        if len(data) != nbytes:
            raise FrameReadError(
                self.path, f"truncated frame {index}: {len(data)} of {nbytes} pixel bytes present"
            )
        if maxval > 255:
            # big-endian on disk; byteswap into a native, writable array
            return np.frombuffer(data, dtype=">u2").reshape(h, w).astype(np.uint16)
        return np.frombuffer(data, dtype=np.uint8).reshape(h, w).copy()


def _pgm_time(comments: dict[str, str]) -> pd.Timestamp:
    value = comments.get(_TIME_KEY)
    if not value:
        return pd.NaT
    value = value.strip()
    if value.upper().endswith("UTC"):
        value = value[:-3].strip()
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError):
        return pd.NaT
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


@contextlib.contextmanager
def _pgm_errors(path: str) -> Iterator[None]:
    """Turn gzip/IO decoding failures inside the block into FrameReadError naming ``path``."""
    try:
        yield
    except FrameReadError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise FrameReadError(path, f"corrupt or truncated PGM stack ({exc})") from None


def read_pgm_stack(path: str | os.PathLike) -> tuple[np.ndarray, list[pd.Timestamp]]:
    """All frames of a PGM stack as (n, h, w) uint16, with each frame's UTC request time."""
    p = os.fspath(path)
    _check_file(p)
    frames: list[np.ndarray] = []
    times: list[pd.Timestamp] = []
    with _pgm_errors(p), _open_pgm(p) as f:
        reader = _PgmReader(f, p)
        for i, (comments, w, h, maxval, nbytes) in enumerate(reader.frames()):
            if frames and frames[0].shape != (h, w):
                h0, w0 = frames[0].shape
                raise FrameReadError(p, f"frame {i} is {w} x {h}, frame 0 is {w0} x {h0}")
            frames.append(reader.raster(i, w, h, maxval, nbytes))
            times.append(_pgm_time(comments))
    stack = np.stack(frames)
    if stack.dtype != np.uint16:
        stack = stack.astype(np.uint16)
    return stack, times


def pgm_times(path: str | os.PathLike) -> list[pd.Timestamp]:
    """Each frame's UTC ``Image request start`` (NaT if absent), from the PGM headers only."""
    p = os.fspath(path)
    _check_file(p)
    with _pgm_errors(p), _open_pgm(p) as f:
        return [_pgm_time(c) for c, *_ in _PgmReader(f, p).frames()]


def _read_pgm_frame(path: str, frame: int) -> np.ndarray:
    n = 0
    with _pgm_errors(path), _open_pgm(path) as f:
        reader = _PgmReader(f, path)
        for i, (_, w, h, maxval, nbytes) in enumerate(reader.frames()):
            if i == frame:
                return reader.raster(i, w, h, maxval, nbytes)
            n = i + 1
    raise FrameReadError(path, f"frame {frame} out of range (the file holds {n} frame(s))")


# ----------------------------------------------------------------------------- public API


def read_frame(path: str | os.PathLike, frame: int = 0) -> np.ndarray:
    """One frame as a 2-D grey uint8/uint16 array; any failure raises FrameReadError.

    ``.npy`` files (preprocessed output of write_frame) come back with their stored dtype.
    """
    p = os.fspath(path)
    if frame < 0:
        raise FrameReadError(p, f"frame index must be >= 0, got {frame}")
    st = _check_file(p)
    if p.lower().endswith(".npy"):
        return _read_npy(p, int(frame))
    if _is_pgm(p):
        if p.lower().endswith(".gz"):
            # Frame k of a gzip stream costs inflating frames 0..k: stages read a stack's frames
            # one after another, so keep the last stacks decoded (keyed by size and mtime).
            stack = _cached_stack(p, st.st_size, st.st_mtime_ns)
            if frame >= len(stack):
                raise FrameReadError(
                    p, f"frame {frame} out of range (the file holds {len(stack)} frame(s))"
                )
            return stack[frame].copy()
        return _read_pgm_frame(p, int(frame))
    return _read_pillow(p, int(frame))


def _read_npy(path: str, frame: int) -> np.ndarray:
    """A .npy frame as written by write_frame (e.g. preprocessed float32); 3-D is a stack."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise FrameReadError(path, f"not a readable .npy array ({exc})") from None
    if arr.ndim == 3:
        if frame >= arr.shape[0]:
            raise FrameReadError(
                path, f"frame {frame} out of range (the file holds {arr.shape[0]} frame(s))"
            )
        return np.array(arr[frame])
    if arr.ndim != 2:
        raise FrameReadError(path, f"array of shape {arr.shape} is not a 2-D frame")
    if frame:
        raise FrameReadError(path, f"frame {frame} out of range (the file holds 1 frame(s))")
    return arr


@functools.lru_cache(maxsize=2)
def _cached_stack(path: str, size: int, mtime_ns: int) -> np.ndarray:
    stack, _ = read_pgm_stack(path)
    stack.flags.writeable = False  # shared between callers: they get copies
    return stack


def write_frame(path: str | os.PathLike, array: np.ndarray, *, compress_level: int = 1) -> None:
    """Write a 2-D uint8/uint16 frame as PNG or TIFF (exact 8/16-bit grey) or .npy, atomically."""
    p = Path(path)
    arr = np.asarray(array)
    ext = p.suffix.lower()
    if ext == ".npy":
        with atomic_path(p) as tmp, open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        return
    fmt = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}.get(ext)
    if fmt is None:
        raise InputError(
            f"{p}: cannot write frames as {ext or 'no suffix'!r}; use .png, .tif or .npy"
        )
    if arr.ndim != 2:
        raise InputError(f"{p}: a frame must be 2-D, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        im = Image.fromarray(arr)
    elif arr.dtype == np.uint16:
        # native little-endian uint16 -> Pillow's I;16, written as 16-bit grey
        im = Image.fromarray(np.ascontiguousarray(arr, dtype="<u2"))
    else:
        raise InputError(f"{p}: frames are written as uint8 or uint16, got {arr.dtype}")
    # Level 1: much faster to write than Pillow's default 6 for noisy 16-bit sky, hardly larger,
    # and as fast to read (inflate speed hardly depends on the level).
    options: dict[str, Any] = {"compress_level": compress_level} if fmt == "PNG" else {}
    with atomic_path(p) as tmp:
        # the temporary name ends in .part: name the format explicitly
        im.save(tmp, format=fmt, **options)

"""Typed YAML configurations, validated with errors that name the file, key and allowed values."""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.errors import ConfigError

T = TypeVar("T")

#: The built-in configs, package data of ``pipeline`` (override with AURORA_CONFIG_DIR); the
#: repository's top-level ``configs`` is a link to the same folder.
CONFIG_DIR = Path(
    os.environ.get("AURORA_CONFIG_DIR") or str(importlib.resources.files("pipeline") / "configs")
)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad YAML becomes a ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a YAML text file (binary or not UTF-8)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}: not valid YAML{where} ({what})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: expected a mapping of keys at the top level, got {type(data).__name__}"
        )
    return data


def _loc(where: str) -> str:
    """``file.yaml:`` or ``file.yaml: key.sub:``: where a message points, ending in one colon."""
    return where if where.endswith(":") else where + ":"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently coerce) one value against a type annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{_loc(where)} {value!r} is not allowed; allowed values: {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{_loc(where)} invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{_loc(where)} expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_loc(where)} expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{_loc(where)} expected {len(args)} values, got {len(value)}")
            items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_loc(where)} expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_loc(where)} expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_loc(where)} expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_loc(where)} expected a whole number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_loc(where)} expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{_loc(where)} expected {_type_name(tp)}, got {value!r}")
    return value


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{_loc(where)} unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{where} {name}" if where.endswith(":") else f"{where}.{name}"
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{_loc(where)} {exc}") from None
    return obj


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<config>") -> T:
    """Build dataclass ``cls`` from a mapping; errors read like ``file.yaml: key.sub: problem``."""
    return _from_dict(cls, data, source + ":")


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    """Load and validate a YAML file into dataclass ``cls``."""
    data = load_yaml(path)
    if not data:  # all defaults is never what an empty file was meant to say
        raise ConfigError(
            f"{path}: the file holds no settings; write them into it (the files under "
            "configs/ show every key)"
        )
    return from_dict(cls, data, str(path))


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any, path: str | os.PathLike) -> None:
    """Write a dataclass or mapping as YAML (the resolved config beside an output)."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


# --------------------------------------------------------------------------- station


@dataclass(frozen=True)
class MLTConfig:
    """How UT becomes magnetic local time at a station."""

    method: Literal["offset", "aacgm"] = "offset"
    offset_hours: float = 3.0
    altitude_km: float = 110.0


@dataclass(frozen=True)
class PreprocessConfig:
    """Which preprocessing steps run, and their parameters (docs/design.md section 5)."""

    dark_subtract: bool = True
    bias_from_corners: bool = True
    stretch_low: float = 0.0
    stretch_high: float = 4000.0
    mask: bool = True
    rotate: bool = False
    rotate_deg: float = 61.11

    def validate(self) -> None:
        if self.stretch_high <= self.stretch_low:
            raise ValueError(
                f"preprocess.stretch_high ({self.stretch_high}) must be above "
                f"stretch_low ({self.stretch_low})"
            )


@dataclass(frozen=True)
class StationConfig:
    """One all-sky imager: site, camera geometry, timing, MLT method and preprocessing."""

    name: str
    code: str
    lat: float
    lon: float
    alt_m: float = 0.0
    wavelength_nm: float | None = None
    raw_size: int = 512
    #: (row, col) of the optical centre in the raw frame.
    optical_centre: tuple[float, float] = (256.0, 256.0)
    crop_size: int = 440
    mask_radius: float = 220.0
    bit_depth: int = 16
    cadence_s: float = 10.0
    #: strftime pattern of the timestamp in a file name (without the extension).
    filename_pattern: str = "N%Y%m%dG%H%M%S"
    #: where frame times come from: the file name, or the headers of multi-frame PGM files.
    time_source: Literal["filename", "pgm_header"] = "filename"
    extensions: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
    mlt: MLTConfig = field(default_factory=MLTConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def validate(self) -> None:
        if not -90 <= self.lat <= 90:
            raise ValueError(f"lat must be within -90..90, got {self.lat}")
        if not -180 <= self.lon <= 360:
            raise ValueError(f"lon must be within -180..360, got {self.lon}")
        if self.crop_size > self.raw_size:
            raise ValueError(
                f"crop_size ({self.crop_size}) must not exceed raw_size ({self.raw_size})"
            )
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {self.bit_depth}")
        top = 2**self.bit_depth - 1
        if self.preprocess.stretch_high > top:
            raise ValueError(
                f"preprocess.stretch_high ({self.preprocess.stretch_high:g}) is above the "
                f"{self.bit_depth}-bit maximum {top}: set the stretch in this camera's counts"
            )

    def scaled(self, size: int) -> StationConfig:
        """The same camera rendered at ``size`` pixels square (tests and quick demos)."""
        f = size / self.raw_size
        return dataclasses.replace(
            self,
            raw_size=size,
            optical_centre=(self.optical_centre[0] * f, self.optical_centre[1] * f),
            crop_size=max(2, int(round(self.crop_size * f))),
            mask_radius=self.mask_radius * f,
        )


def station_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve ``yrs`` to configs/stations/yrs.yaml; an existing path is used as is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    candidate = CONFIG_DIR / "stations" / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(q.stem for q in (CONFIG_DIR / "stations").glob("*.yaml"))
        raise ConfigError(
            f"unknown station {str(name_or_path)!r}; known stations: {', '.join(known)} "
            "(or give the path of a station YAML file)"
        )
    return candidate


def load_station(name_or_path: str | os.PathLike = "yrs") -> StationConfig:
    """Load a station config by name (``yrs``) or path."""
    return load_config(StationConfig, station_path(name_or_path))


def resolve_station(
    given: StationConfig | str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    fallback: StationConfig | str | os.PathLike | dict[str, Any] | None = None,
) -> StationConfig:
    """The station a stage uses: ``given`` (config, name or YAML path), else ROOT/calib/station.yaml
    (written by synth and preprocess beside their frames), else ``fallback``, else yrs."""
    for candidate in (
        given,
        None if root is None else Path(root) / "calib" / "station.yaml",
        fallback,
    ):
        if candidate is None:
            continue
        if isinstance(candidate, StationConfig):
            return candidate
        if isinstance(candidate, dict):
            return from_dict(
                StationConfig, candidate, "station (recorded with the checkpoint/index)"
            )
        if isinstance(candidate, Path) and candidate is not given and not candidate.is_file():
            continue
        return load_station(candidate)
    return load_station("yrs")

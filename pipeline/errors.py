"""The project's error hierarchy: user mistakes become one clear CLI line, never a traceback."""

from __future__ import annotations


class AuroraError(Exception):
    """Base class for errors in the user's input, not a bug; the CLI prints them as one line."""


class ConfigError(AuroraError):
    """A configuration file or option is invalid (names the file, key and allowed values)."""


class FrameReadError(AuroraError):
    """A frame file cannot be read or decoded."""

    def __init__(self, path: object, reason: str | None = None) -> None:
        if reason is None:
            # Rebuilt from a message alone (torch's DataLoader re-raises worker errors as
            # type(exc)(text)): keep the last line, "<path>: <reason>".
            last = str(path).strip().splitlines()[-1] if str(path).strip() else ""
            last = last.split("Error: ", 1)[-1]
            path, _, reason = last.partition(": ")
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class FrameGeometryError(FrameReadError):
    """A frame decodes but has a size or bit depth the station does not expect."""


class CheckpointError(AuroraError):
    """A checkpoint is missing, unsafe, or belongs to another model."""


class InputError(AuroraError):
    """An input path, table or option value is unusable."""

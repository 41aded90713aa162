"""The one protocol every stage follows to write its ``--out`` folder.

See docs/design.md, "Output folders".

A stage's folder holds its outputs and one run record, ``_run.json``: a flat JSON object with
the ``command`` that wrote the folder, the run's settings, and ``finished`` (true only once every
output is in place). The protocol:

1. refuse a folder that holds another stage's output (its run record names another command, or
   it holds a checkpoint, a labelled set, a manifest or a Zarr store), or a file;
2. clear ``.*.part`` leftovers of killed writers;
3. outputs are either staged (written into a hidden staging folder, then moved in together with
   the record last: :meth:`OutputFolder.install`) or written in place by a resumable stage, which
   first marks the record unfinished (:meth:`OutputFolder.begin`) and finishes it last
   (:meth:`OutputFolder.finish`);
4. a run that fails in a folder it created, before writing any output, removes the folder.

So a folder whose record says ``finished: true`` holds one whole run's outputs, and an
interruption never leaves a record that claims a completion that did not happen.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pipeline.errors import InputError

#: The run record of every stage's output folder.
RUN_RECORD = "_run.json"

#: What each command's folder is, for the refusal message.
COMMAND_OUTPUTS: dict[str, str] = {
    "synth": "a synthetic archive or set",
    "preprocess": "preprocessed frames",
    "train": "a checkpoint",
    "pretrain": "a pre-trained checkpoint",
    "evaluate": "evaluate results",
    "cv": "cross-validation results",
    "classify-archive": "classify-archive predictions",
    "occurrence": "occurrence results",
    "index": "a retrieval index",
    "retrieve": "retrieval results",
    "run": "a workflow run",
}

#: Files that say what a folder is although no run record does (data made elsewhere, or the
#: contract files of a stage's output); ``owns`` lets the stage that writes one pass.
FOLDER_MARKERS: dict[str, str] = {
    "model.safetensors": "a checkpoint",
    "last.pt": "a training run",
    "labels.parquet": "a labelled set",
    "manifest.parquet": "an archive scan",
    "zarr.json": "a Zarr store (a frame store of `preprocess --format zarr`?)",
}


def read_run_record(folder: str | os.PathLike, strict: bool = False) -> dict[str, Any] | None:
    """The run record of ``folder``, or None when it has none.

    An unreadable record reads as an empty dict, or (``strict``) is an InputError naming it.
    """
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        if strict:
            raise InputError(
                f"{path}: not valid JSON ({exc}); delete it or pass --overwrite"
            ) from None
        return {}
    if not isinstance(record, dict):
        if strict:
            raise InputError(
                f"{path}: not a run record (a JSON object); delete it or pass --overwrite"
            )
        return {}
    return record


def is_finished(folder: str | os.PathLike, command: str | None = None) -> bool:
    """True when ``folder``'s run record says a run (of ``command``, if given) finished."""
    record = read_run_record(folder) or {}
    if command is not None and record.get("command") != command:
        return False
    return record.get("finished") is True


def refuse_foreign_out(out: Path, command: str, owns: Sequence[str] = ()) -> None:
    """InputError when ``out`` is a file or holds another stage's output."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give `{command}` a folder")
    if not out.is_dir():
        return
    record = read_run_record(out)
    if record is not None and record.get("command") != command:
        other = record.get("command")
        what = COMMAND_OUTPUTS.get(str(other), f"the output of `{other}`")
        raise InputError(
            f"--out {out} holds {what} ({RUN_RECORD}); give `{command}` a folder of its own"
        )
    for name, what in FOLDER_MARKERS.items():
        if name not in owns and (out / name).exists():
            raise InputError(
                f"--out {out} holds {what} ({name}); give `{command}` a folder of its own"
            )


def clear_partials(folder: Path) -> int:
    """Remove the ``.*.part`` files and staging folders killed writers left in ``folder``."""
    n = 0
    for p in folder.glob(".*.part"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) for the block and raise KeyboardInterrupt after it, if one came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except (ValueError, TypeError):  # no signal handling here (embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
        elif caught and previous != signal.SIG_IGN:
            raise KeyboardInterrupt


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically, with the usual permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=1, default=str) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class OutputFolder:
    """A stage's ``--out`` folder, opened with ``with``: refuses, stages, installs, records last.

    ``record``: the run's settings, written flat into ``_run.json`` with ``command`` and
    ``finished``. ``owns``: marker files this stage writes itself (see FOLDER_MARKERS).
    """

    def __init__(
        self,
        out: str | os.PathLike,
        command: str,
        record: Mapping[str, Any] | None = None,
        *,
        owns: Sequence[str] = (),
    ) -> None:
        self.path = Path(out)
        self.command = command
        self.record: dict[str, Any] = dict(record or {})
        self.owns = tuple(owns)
        self.created = False
        self._staging: Path | None = None

    def __enter__(self) -> OutputFolder:
        refuse_foreign_out(self.path, self.command, self.owns)
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        clear_partials(self.path)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        if exc_type is not None and self.created and self._holds_nothing():
            shutil.rmtree(self.path, ignore_errors=True)

    def _holds_nothing(self) -> bool:
        left = [p for p in self.path.iterdir() if p.name != RUN_RECORD]
        return not left and not is_finished(self.path)

    @property
    def staging(self) -> Path:
        """A hidden folder inside OUT (same file system) to write outputs into before install."""
        if self._staging is None:
            self._staging = Path(
                tempfile.mkdtemp(prefix=f".{self.command}-", suffix=".part", dir=self.path)
            )
        return self._staging

    def previous(self) -> dict[str, Any] | None:
        """The record an earlier run of this stage left in OUT (None when there is none)."""
        return read_run_record(self.path)

    def same_settings(self) -> bool:
        """True when OUT's record holds this run's settings (an earlier run to resume)."""
        old = self.previous() or {}
        return all(old.get(k) == v for k, v in self._plain(self.record).items())

    def begin(self, **extra: Any) -> None:
        """Mark OUT as holding an unfinished run of these settings (stages that write in place)."""
        write_json(self.path / RUN_RECORD, self._content(False, extra))

    def finish(self, **extra: Any) -> None:
        """Mark the run finished: call after every output is in place."""
        write_json(self.path / RUN_RECORD, self._content(True, extra))

    def install(self, names: Sequence[str], **extra: Any) -> None:
        """Move the staged outputs ``names`` into OUT, the run record last.

        The old record goes first; a name missing from the staging folder is a stale output of an
        earlier run and is removed from OUT. Ctrl-C is held back for these few renames.
        """
        staging = self.staging
        umask = os.umask(0)
        os.umask(umask)
        with interrupts_deferred():
            (self.path / RUN_RECORD).unlink(missing_ok=True)
            for name in names:
                src, dst = staging / name, self.path / name
                if src.exists():
                    if src.is_file():
                        os.chmod(src, 0o666 & ~umask)
                    if dst.is_dir() and not dst.is_symlink():
                        shutil.rmtree(dst)
                    os.replace(src, dst)
                elif dst.is_dir() and not dst.is_symlink():
                    shutil.rmtree(dst)
                else:
                    dst.unlink(missing_ok=True)
            self.finish(**extra)

    def _content(self, finished: bool, extra: Mapping[str, Any]) -> dict[str, Any]:
        return {"command": self.command, **self._plain(self.record), **extra, "finished": finished}

    @staticmethod
    def _plain(record: Mapping[str, Any]) -> dict[str, Any]:
        # Compare and store what JSON gives back (tuples as lists, paths as text).
        return json.loads(json.dumps(dict(record), default=str))

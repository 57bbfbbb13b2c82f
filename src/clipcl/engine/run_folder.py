"""Who may write a run folder, and how a restart replaces one.

- **Lock.** A run holds an exclusive ``flock`` on ``<output_dir>/.clipcl-lock`` from before it reads
  the folder until it ends. The kernel drops the lock when the process dies, so a crashed or killed
  run never leaves it stuck; a second run into the same folder is refused with one line.
- **Marker.** ``<output_dir>/.clipcl-run`` (JSON: format, config digest, clipcl version, creation
  time) says clipcl made the folder. A folder that is not empty and has neither the marker nor an
  earlier clipcl release's progress file is somebody else's: it is refused, ``--restart`` or not.
- **Restart.** ``--restart`` replaces only what clipcl writes (:data:`RUN_OUTPUTS`), and only after the
  new run has been built and checked (config, data, model): the old outputs are first moved, with
  ``rename``, into one hidden folder (progress file first, so a crash part-way leaves no progress
  that points at a moved checkpoint), and that folder is deleted. A crash during the move leaves a
  ``.clipcl-replaced-*`` folder that the next start deletes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Any

from clipcl import __version__
from clipcl.atomic_files import atomic_write_json
from clipcl.engine.context import RunDirectory, RunError, read_json_file

LOCK_NAME = ".clipcl-lock"
MARKER_NAME = ".clipcl-run"
MARKER_FORMAT = "clipcl-run-1"
REPLACED_PREFIX = ".clipcl-replaced-"
RUN_OUTPUTS = ("progress.json", "results.json", "summary.md", "config.yaml", "checkpoints", "tensorboard",
               "wandb", "mlflow", "accuracy_matrix.png", "task_accuracy.png", "anytime_accuracy.png",
               "alignment.png", MARKER_NAME)
"""Everything a run writes into its folder, in the order a restart moves it away."""


class RunLock:
    """An exclusive lock on a run folder, held by one process for the whole run."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.created_folder = False
        self._handle = None

    def acquire(self) -> RunLock:
        if not self.root.exists():
            self.created_folder = True
        while True:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
            except OSError as error:
                raise RunError(f"cannot write to output_dir {self.root}: {error.strerror or error}") from None
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise RunError(f"{self.root} is in use by another clipcl run ({holder}); wait for it to end "
                               "or choose another output_dir") from None
            # A run that could not start removes its lock file (release below); a process that
            # opened that file just before holds a lock on a file no longer in the folder. Lock the
            # file that is there now, or try again.
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(handle.fileno()).st_ino:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self._handle = handle
        return self

    def release(self, wrote_nothing: bool = False) -> None:
        """Drop the lock. ``wrote_nothing``: the run could not start, so it leaves nothing behind: not
        its lock file (in a folder that is not a clipcl run, or not yet one), nor a folder it created."""
        if self._handle is None:
            return
        if wrote_nothing:
            self.path.unlink(missing_ok=True)
            if self.created_folder:
                try:
                    self.root.rmdir()
                except OSError:
                    pass  # something else is in it now: leave it
        self._handle.close()
        self._handle = None


def previous_run(directory: RunDirectory, restart: bool = False) -> dict[str, Any] | None:
    """What an earlier run left in ``directory``: ``{"config_digest", "measured", "finished"}``, None for
    an empty or new folder. Refuses a folder clipcl did not make, and damaged progress or results
    unless ``restart`` (then a clipcl folder with damaged files is simply replaced)."""
    root = directory.root
    if not root.exists():
        return None
    if not root.is_dir():
        raise RunError(f"output_dir {root} is a file, not a folder")
    for leftover in root.glob(f"{REPLACED_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)  # a restart that crashed while moving the old run away
    entries = [entry for entry in root.iterdir() if entry.name != LOCK_NAME]
    if not entries:
        return None
    marker = root / MARKER_NAME

    def read(path: Path) -> Any:
        if not path.exists():
            return None
        try:
            return read_json_file(path)
        except RunError:
            if restart and marker.exists():
                # A clipcl run (its marker is there) with a damaged file: --restart discards it anyway.
                # Without the marker the folder may be somebody else's: refuse, never delete.
                return {"damaged": True}
            raise

    progress, results = read(directory.progress), read(directory.results)
    digest = None
    if marker.exists():
        data = read(marker)
        if restart and data == {"damaged": True}:
            data = {"format": MARKER_FORMAT}
        if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
            raise RunError(f"{marker} is not a clipcl run marker; choose another output_dir")
        digest = data.get("config_digest")
    elif isinstance(progress, dict) and "config_digest" in progress:
        digest = progress["config_digest"]  # a folder of a clipcl release before the marker
    else:
        raise RunError(f"output_dir {root} is not empty and was not made by clipcl (no {MARKER_NAME}); "
                       "choose another output_dir")
    for path, data in ((directory.progress, progress), (directory.results, results)):
        if data is not None and not isinstance(data, dict) and not restart:
            raise RunError(f"{path} is damaged (not a JSON object); pass --restart to start this run over")
    return {"config_digest": digest, "measured": progress is not None or results is not None,
            "finished": results is not None, "progress": progress if isinstance(progress, dict) else {}}


def replace_outputs(directory: RunDirectory) -> None:
    """Move every output of the earlier run away, then delete it (see the module docstring)."""
    root = directory.root
    replaced = root / f"{REPLACED_PREFIX}{os.getpid()}"
    replaced.mkdir(exist_ok=True)
    for name in RUN_OUTPUTS:
        path = root / name
        if path.exists() or path.is_symlink():
            os.replace(path, replaced / name)
    shutil.rmtree(replaced, ignore_errors=True)


def write_marker(directory: RunDirectory, config_digest: str) -> None:
    atomic_write_json(directory.root / MARKER_NAME, {
        "format": MARKER_FORMAT, "config_digest": config_digest, "clipcl": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


__all__ = ["RunLock", "previous_run", "replace_outputs", "write_marker"]

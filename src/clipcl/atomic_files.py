"""Atomic file writes: readers see a file's old content or its new, never half of it (the new file
replaces the old in one ``os.replace``), and an exception while writing leaves the old file and no
temporary one. A killed process may leave a ``.<name>.*.tmp`` file beside the target; nothing is
fsynced, so a power loss may lose the newest write. Light on purpose (no torch), so reports and
configs can use it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _process_umask() -> int:
    # Read once, at import: setting it to read it is process-wide, so doing that while other threads
    # create files would give those files the wrong mode.
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _process_umask()


def _readable_like_any_new_file(temporary: str) -> None:
    """mkstemp makes a file only its owner may read; give it the mode a plain new file would get
    under the user's umask, so a run's outputs can be shared like any other file."""
    os.chmod(temporary, 0o666 & ~_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """A temporary file's name in ``path``'s folder to write to. When the block ends, it replaces
    ``path`` (with the mode a plain new file gets), so readers see the old content or the new,
    never half of it; when the block raises, it is removed and ``path`` is left as it was. A block
    that ends without raising has finished the file: whatever it wrote (even nothing) replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield temporary
        _readable_like_any_new_file(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (:func:`atomic_path`)."""
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as file:
        file.write(text)


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_figure(figure, path: str | Path) -> None:
    """Save a matplotlib figure as a PNG atomically (:func:`atomic_path`), then close it, also on failure."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=110)
    finally:
        plt.close(figure)

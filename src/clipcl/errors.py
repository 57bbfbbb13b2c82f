"""The one base class of every error a user can cause and fix.

The ``clipcl`` command prints the first line of a :class:`UserError` as ``clipcl: error: ...`` and
exits with 2; any other exception is a bug in clipcl, and the command prints its traceback.
Subclasses keep their historical built-in bases (``ValueError``, ``RuntimeError``) so code that
catches those still works.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unusable state that the user can fix. The message is one line that names the
    file or key and says what to do."""


__all__ = ["UserError"]

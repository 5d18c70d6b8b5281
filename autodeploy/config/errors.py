"""Errors the user caused (a bad config, model path, checkpoint or value).

``UserError`` is the one type for "the user caused it": the command line prints its message as one
line and exits with code 2 (a traceback only with ``HYDRA_FULL_ERROR=1`` or ``hydra.verbose``).
Anything else is a bug and keeps its traceback. ``ConfigError`` is raised before any model work and
names the key, value or path.
"""

from __future__ import annotations


class UserError(ValueError):
    pass


class ConfigError(UserError):
    pass


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The UserError that caused ``exc`` (itself, or in its ``__cause__``/``__context__`` chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None

"""Grouped test fixtures whose cases fail on their own.

A session fixture that builds several cases (models, exports, rank runs) at once would fail every
test that uses it when one case breaks. ``PerCase`` builds each case on first use and keeps its
error: the tests of that case fail with it, the others run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping


class CaseFailed(RuntimeError):
    """The shared build of one case failed; the message names the case and the original error."""


class PerCase(Mapping):
    def __init__(self, names: Iterable[str], build: Callable[[str], object]):
        self._names = list(names)
        self._build = build
        self._built: dict[str, tuple[bool, object]] = {}

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        if name not in self._built:
            try:
                self._built[name] = (True, self._build(name))
            except Exception as e:  # noqa: BLE001 - kept for this case's tests
                self._built[name] = (False, e)
        ok, value = self._built[name]
        if not ok:
            raise CaseFailed(f"{name}: {type(value).__name__}: {value}") from value
        return value

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)

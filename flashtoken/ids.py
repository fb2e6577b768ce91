"""Token ids as long-lived lists whose ints are shared: one int object per id value.

A cached prefix keeps its tokens as a Python list (what tiktoken returns, and what ``head +
tail`` concatenates fastest). A list of fresh ints costs 8 bytes a token for the list and ~32 for
each int; sharing the ints leaves the 8 (a 32 KiB prefix: ~60 KB instead of ~300 KB), which is
most of a worker's memory for its cached prefixes.

With numpy (the daemon extra brings it), ids arriving as uint32 bytes (the host map, the daemon's
replies) become such a list with one ``take`` from an object array of the shared ints, ~7 ns a
token, faster than ``memoryview.tolist()`` makes fresh ints; without it, a ``map`` over the table
(~16 ns a token).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_numpy: Any = None  # the module, imported when first needed: `import flashtoken` stays light
_numpy_checked = False

__all__ = ["MAX_TOKEN_ID", "token_list", "token_list_from_array", "token_list_from_bytes"]

MAX_TOKEN_ID = 2**22  # far above any vocabulary; bounds the table against garbage ids

_ints: list[int] = []
_table: Any = None  # numpy object array of the same ints as _ints, made when first needed


def token_list(tokens: Iterable[int]) -> list[int]:
    """``list(tokens)``, every id the one shared int object for its value (~16 ns a token)."""
    try:
        return list(map(_ints.__getitem__, tokens))
    except IndexError:  # an id above any seen so far: grow the table (for every encoding)
        tokens = list(tokens)
        _grow(max(tokens, default=0), min(tokens, default=0))
        return list(map(_ints.__getitem__, tokens))


def token_list_from_bytes(data: bytes | memoryview) -> list[int]:
    """The shared-int list of little-endian uint32 ids in ``data`` (e.g. a memoryview of a
    mapping: it is read, not kept)."""
    numpy = _numpy_module()
    if numpy is None:
        return token_list(memoryview(data).cast("B").cast("I"))
    ids = numpy.frombuffer(data, dtype="<u4")
    # take checks every index itself: an id beyond the table raises IndexError, and only then
    # is the largest one looked for. Rejected: ``ids.max()`` before each take, which cost a
    # fresh worker ~40 us on its first hit (numpy's reduction, run cold), twice what it saves.
    try:
        return _table.take(ids).tolist()
    except (IndexError, AttributeError):  # an id above any seen so far, or no table yet
        return token_list_from_array(ids, int(ids.max(initial=0)))


def token_list_from_array(ids: Any, top: int) -> list[int]:
    """The shared-int list of a numpy integer array ``ids`` whose largest id is ``top`` (the
    caller knows it already: a fast backend's answer is checked against it)."""
    if _table is None or top >= len(_table):
        _numpy_module()
        _grow(top, 0)
    return _table.take(ids).tolist()


def warm(vocabulary: int) -> None:
    """Make the table for ids below ``vocabulary`` now (a worker's start-up, ~5 ms for 200k),
    not in its first request."""
    _numpy_module()
    _grow(vocabulary - 1, 0)


def _numpy_module() -> Any:
    global _numpy, _numpy_checked
    if not _numpy_checked:
        _numpy_checked = True
        try:
            import numpy
        except ImportError:  # the core does not need it
            _numpy = None
        else:
            _numpy = numpy
    return _numpy


def _grow(top: int, bottom: int) -> None:
    """Make ``_ints`` (and the numpy table) hold ``top``; extended, never rebuilt, so the ints
    handed out before stay the shared ones."""
    global _table
    if top >= MAX_TOKEN_ID or bottom < 0:
        raise ValueError(f"token ids must lie in [0, {MAX_TOKEN_ID}), not {top}")
    if top >= len(_ints):
        _ints.extend(range(len(_ints), (top | 0xFFF) + 1))
        _table = None
    if _numpy is not None and (_table is None or len(_table) != len(_ints)):
        _table = _numpy.array(_ints, dtype=object)

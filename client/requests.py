"""What every request of one client carries, and a request on its way (sans-IO).

``RequestContext`` owns the parts shared by the declared-prefix requests (GET, client/core.py)
and the automatic-reuse ones (AUTO, TELL, client/chains.py): the encoding, the namespace and
its tag, the encoding's id (computed once, lazily), the fill flag and the request ids. A
``Pending`` is one request sent and not yet answered: its frames, and how to check its reply.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tiktoken

from flashtoken.encodings import encoding_id
from flashtoken.wire import namespace_tag

__all__ = ["Pending", "RequestContext"]

_ID_MASK = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Pending:
    """A request on its way: its id and frames, the reply types that answer it, and ``check``,
    which turns a hit into the result (None: the hit is wrong, distrust the daemon)."""

    id: int
    frames: list[bytes]
    hit: type
    miss: type
    check: Callable[[Any], Any]


class RequestContext:
    """The encoding and namespace of one client's requests, and their ids."""

    def __init__(self, enc: tiktoken.Encoding, namespace: bytes, fill: bool) -> None:
        self.enc = enc
        self.namespace = namespace
        self.tag = namespace_tag(namespace)  # the daemon derives the key from it and the bytes
        self.fill = fill
        self._eid: bytes | None = None
        # next() of an itertools.count is one C call: atomic under the GIL, so two threads never
        # take the same id (a Python-level ``+= 1`` could interleave between read and write).
        self._ids = itertools.count(1)

    @property
    def eid(self) -> bytes:
        """The encoding's id (``encoding_id``): ~40 ms once per process, so not at construction."""
        if self._eid is None:
            self._eid = encoding_id(self.enc)
        return self._eid

    def next_id(self) -> int:
        """A new request id: 1 .. 2^64-1, wrapping (0 means "unknown")."""
        return next(self._ids) & _ID_MASK or next(self._ids) & _ID_MASK

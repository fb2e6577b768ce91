"""tiktoken's batch, numpy and decode calls on the caches, with tiktoken's signatures.

Each is a composition of the cache's own encode: ``encode_batch`` maps it over the texts on a
thread pool, as tiktoken does (the encodes of tiktoken and of the fast backends release the
GIL; the caches' own Python does not, so a batch of cache hits gains little from threads, and a
batch of misses gains what tiktoken's would); ``to_numpy`` wraps ``array('I')`` ids without a
copy. numpy is imported where it is first needed, through flashtoken/ids.py.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from flashtoken.ids import _numpy_module

__all__ = ["encode_batch", "to_numpy"]

_T = TypeVar("_T")


def encode_batch(encode: Callable[[str], _T], texts: Sequence[str], num_threads: int) -> list[_T]:
    """``[encode(t) for t in texts]``, on ``num_threads`` threads (tiktoken's default: 8)."""
    if num_threads <= 1 or len(texts) <= 1:
        return [encode(text) for text in texts]
    with ThreadPoolExecutor(min(num_threads, len(texts))) as pool:
        return list(pool.map(encode, texts))


def to_numpy(ids: array[int] | list[int]) -> Any:
    """A ``numpy.ndarray`` of uint32 over ``ids`` (an ``array('I')`` is wrapped, not copied).

    Raises ImportError if numpy is not installed (as tiktoken's ``encode_to_numpy`` does).
    """
    numpy = _numpy_module()
    if numpy is None:
        raise ImportError("encode_to_numpy needs numpy: pip install numpy")
    if not isinstance(ids, array) or ids.typecode != "I" or ids.itemsize != 4:
        ids = array("I", ids)
    return numpy.frombuffer(ids, dtype=numpy.uint32)

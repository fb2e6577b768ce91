"""The daemon's memory budget: the store's ``max_bytes`` plus a fixed, documented overhead.

Whatever a local process sends, the daemon's resident memory stays within
``max_bytes + overhead_bytes(...)`` (``stats``: ``rss_bytes`` against ``limit_rss_bytes``). The
store counts each entry at its real cost (daemon/store.py, ``ENTRY_OVERHEAD``). Everything
else that grows with what clients send is bounded here, in bytes, not in messages:

- replies handed to ZeroMQ and not yet sent (a client that never reads its replies): per peer
  and in total (``Replies``); a reply over either is dropped and counted (``replies_dropped``),
  and its client falls back to encoding locally, as it does on any lost reply;
- publications queued for subscribers (one copy, shared by every subscriber's queue);
- TELLs parked for their parent's fill, and the requests waiting for or in a fill.

What ZeroMQ buffers on the receiving side is bounded by its receive high-water mark per peer
(``RECEIVE_HWM`` messages of at most ``max_prefix_bytes`` each) and the peer cap (daemon/limits.py).
A reply, a publication or a fill is dropped, never waited for: the loop keeps serving.
"""

from __future__ import annotations

from collections import deque
from typing import Any

MiB = 1024 * 1024

REPLY_BYTES_PER_PEER = 20 * MiB  # one largest reply (16 MiB of tokens for a 4 MiB text) fits
REPLY_BYTES_TOTAL = 64 * MiB
PUBLISH_BYTES = 32 * MiB
PARKED_BYTES = 16 * MiB
PENDING_FILL_BYTES = 64 * MiB
# Replies smaller than this are copied by pyzmq and not tracked: at most SEND_HWM of them per peer.
TRACKED_FRAME_BYTES = 2048
SEND_HWM = 16  # messages queued per peer (a client has one request in flight)
RECEIVE_HWM = 8  # requests queued per peer before ZeroMQ stops reading that peer's socket
MAX_PEERS = 4096  # connections at once, whatever the descriptor limit allows (daemon/limits.py)
# What libzmq keeps per connection (its engine's buffers, pipes, session), measured and rounded.
PEER_BYTES = 32 * 1024
# The interpreter, ZeroMQ, two loaded encodings (cl100k_base and o200k_base: ~100 MiB as Python
# dicts) and the fill threads' working memory (a 4 MiB text's tokens as Python ints: ~60 MiB a
# thread), measured and rounded up.
BASE_BYTES = 256 * MiB


def overhead_bytes(fill_threads: int, peers: int) -> int:
    """The fixed overhead above ``max_bytes`` (docs/INTEGRATION.md, "Memory"), for at most
    ``peers`` connections."""
    untracked = peers * (SEND_HWM * TRACKED_FRAME_BYTES + PEER_BYTES)
    return (
        BASE_BYTES
        + max(0, fill_threads - 2) * 64 * MiB
        + REPLY_BYTES_TOTAL
        + PUBLISH_BYTES
        + PARKED_BYTES
        + PENDING_FILL_BYTES
        + untracked
    )


class Outstanding:
    """Bytes handed to ZeroMQ zero-copy and not yet released by it, by owner, with a cap each.

    ZeroMQ tells when it is done with a zero-copy frame (a ``MessageTracker``); until then the
    bytes are ours to count. ``admit`` reaps the finished ones first, so its answer is current.
    """

    def __init__(self, per_owner: int, total: int) -> None:
        self.per_owner = per_owner
        self.total_limit = total
        self.total = 0
        self.by_owner: dict[Any, int] = {}
        self._sent: deque[tuple[Any, Any, int]] = deque()
        self.dropped = 0

    def admit(self, owner: Any, size: int) -> bool:
        if size < TRACKED_FRAME_BYTES:
            return True
        if self._over(owner, size):
            self.reap()
            if self._over(owner, size):
                self.dropped += 1
                return False
        return True

    def _over(self, owner: Any, size: int) -> bool:
        return (
            self.total + size > self.total_limit
            or self.by_owner.get(owner, 0) + size > self.per_owner
        )

    def sent(self, owner: Any, size: int, tracker: Any) -> None:
        if size < TRACKED_FRAME_BYTES or tracker is None or tracker.done:
            return
        self._sent.append((tracker, owner, size))
        self.total += size
        self.by_owner[owner] = self.by_owner.get(owner, 0) + size

    def reap(self) -> None:
        """Forget the frames ZeroMQ has released (sent, or dropped with their peer)."""
        if not self._sent:
            return
        keep: deque[tuple[Any, Any, int]] = deque()
        for item in self._sent:
            tracker, owner, size = item
            if tracker.done:
                self.total -= size
                left = self.by_owner[owner] - size
                if left:
                    self.by_owner[owner] = left
                else:
                    del self.by_owner[owner]
            else:
                keep.append(item)
        self._sent = keep

"""Admin requests: STATS and PING on a socket of their own (``flashtoken-daemon stats``,
``Client.daemon_stats()``, the daemon's ``/metrics``).

One request, one reply, one short-lived DEALER: the CLI and the metrics endpoint need no client
(no L1, no breaker, no follower thread), only the wire. The socket is checked like the
client's before it connects (``check_daemon_socket``: only our own user can be the daemon).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import zmq

from flashtoken.errors import DaemonError, DaemonTimeout, DaemonUnavailable, ProtocolError

from .addresses import check_daemon_socket
from .auth import secure_client
from .codec import MAX_HEADER_BYTES
from .replies import ErrorReply, Pong, Reply, StatsReply, parse_reply
from .requests import PingRequest, Request, StatsRequest

__all__ = ["ping", "request_stats"]

_ids = itertools.count(1)


def request_stats(
    address: str, *, timeout_ms: int = 1000, context: zmq.Context | None = None
) -> dict[str, Any]:
    """The STATS reply of the daemon at ``address``: ``{"stats": {...}, "settings": {...}}``.

    ``context``: the caller's zmq.Context (a client's, per process); by default one made for
    this request and ended after it.

    Raises DaemonTimeout if no reply comes within ``timeout_ms``; DaemonUnavailable if the
    socket is not one our user's daemon can have made, or fails; DaemonError for an error reply
    or a malformed one.
    """
    reply = _ask(address, StatsRequest(next(_ids)), StatsReply, timeout_ms, context)
    assert isinstance(reply, StatsReply)
    return {"stats": reply.stats, "settings": reply.settings}


def ping(address: str, *, timeout_ms: int = 1000, context: zmq.Context | None = None) -> Pong:
    """The PING reply (the daemon's pid and version). Raises as ``request_stats`` does."""
    reply = _ask(address, PingRequest(next(_ids)), Pong, timeout_ms, context)
    assert isinstance(reply, Pong)
    return reply


def _ask(
    address: str,
    request: Request,
    expect: type[Reply],
    timeout_ms: int,
    context: zmq.Context | None,
) -> Reply:
    check_daemon_socket(address)  # DaemonUnavailable: not a socket only our user could serve
    ctx = context or zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_HEADER_BYTES)  # an admin reply is a header only
        # Queue only on a completed connection: no request waits for a daemon that is not there.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        secure_client(sock, address)  # tcp://: CURVE, keys from the key file (auth.py)
        sock.connect(address)
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            try:
                sock.send_multipart(request.frames(), zmq.NOBLOCK)
                break
            except zmq.Again:  # not connected yet: wait for it within the budget
                remaining = _ms_left(deadline)
                if remaining <= 0 or not sock.poll(remaining, zmq.POLLOUT):
                    raise DaemonTimeout(
                        f"no flashtoken-daemon is accepting connections at {address}"
                        f" (waited {timeout_ms} ms); start one with `flashtoken-daemon`"
                    ) from None
        while True:
            if not sock.poll(_ms_left(deadline), zmq.POLLIN):
                raise DaemonTimeout(
                    f"no reply from a flashtoken-daemon at {address} within"
                    f" {timeout_ms} ms; is it running (or stopped)?"
                )
            try:
                reply = parse_reply(sock.recv_multipart(zmq.NOBLOCK))
            except ProtocolError as exc:
                raise DaemonError(f"malformed reply from {address}: {exc}") from exc
            if reply.id != request.id:
                continue  # not ours (cannot happen on a fresh socket; cheap to be sure)
            if isinstance(reply, ErrorReply):
                raise DaemonError(f"{reply.error}: {reply.message}")
            if not isinstance(reply, expect):
                raise DaemonError(f"malformed {request.op} reply from {address}")
            return reply
    except zmq.ZMQError as exc:
        raise DaemonUnavailable(f"cannot reach a flashtoken-daemon at {address}: {exc}") from exc
    finally:
        sock.close(linger=0)
        if context is None:
            ctx.term()


def _ms_left(deadline: float) -> int:
    # Rounded up: a poll of 0 ms would give up on a reply that is microseconds away.
    left = deadline - time.monotonic()
    return int(left * 1000) + 1 if left > 0 else 0

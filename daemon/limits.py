"""Descriptors: the daemon raises its soft ``RLIMIT_NOFILE`` and caps its peers below it.

Every peer costs the daemon one descriptor. libzmq (4.3) aborts the whole process when an
``ipc://`` accept fails with ``EMFILE`` (``Too many open files (src/ipc_listener.cpp:297)``:
~1,050 idle connections did it with the usual soft limit of 1,024). So the daemon raises the soft
limit to the hard one at start (systemd: ``LimitNOFILE``), and watches its sockets' connections
(a ZeroMQ monitor). libzmq accepts faster than the loop hears of it, so a storm is stopped at
the door first: past half the cap the socket files are moved aside (``{path}.full``), and a new
``connect()`` fails with ENOENT (the client's ZeroMQ retries later, its calls go local meanwhile;
the listening socket is unchanged); below three eighths of it they are moved back. A peer that
still gets in beyond ``cap`` is shut down at once (its descriptor is libzmq's, which closes it).
The rest of the soft limit stays free for the daemon's own descriptors and for what a storm's
lag lets in. Rejected: mode 0000 on the socket file (it does not stop root); unbinding while
full (rebinding races with a second daemon's start); holding spare descriptors to release when
full (libzmq's accept fails before the loop could release them).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from .budget import MAX_PEERS

__all__ = ["PeerLimit", "raise_nofile"]

log = logging.getLogger("flashtoken.daemon")

_MOST = 1 << 20  # no more than this, even with an unlimited hard limit


def raise_nofile() -> int:
    """Raise the soft descriptor limit towards the hard one; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _MOST if hard == resource.RLIM_INFINITY else min(hard, _MOST)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:  # a platform that refuses: keep what we have
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, want, exc)
    return soft if soft != resource.RLIM_INFINITY else _MOST


def peer_cap(soft: int) -> int:
    """Peers allowed at once: the soft limit less a reserve (own descriptors, a storm's lag),
    and never more than the memory budget counts (``MAX_PEERS``)."""
    return max(8, min(MAX_PEERS, soft - max(64, soft // 4)))


class PeerLimit:
    """Counts the peers of the monitored sockets and shuts down those beyond the cap."""

    # A failed handshake is a peer refused by tcp://'s authentication (flashtoken/wire/auth.py):
    # a CURVE client without the daemon's key (PROTOCOL), or with a client key it does not know
    # (AUTH: its ZAP handler said no). Counted here, where every connection is seen.
    HANDSHAKE_FAILED = (
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    )
    EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.gate_at = max(2, cap // 2)
        self.open_at = self.gate_at * 3 // 4
        self.peers: set[int] = set()
        self.refused = 0
        self.gated = 0  # times the door was shut
        self.auth_refused = 0  # handshakes failed: peers without the tcp:// keys
        self.monitors: list[zmq.Socket] = []
        self.paths: list[str] = []  # the socket files that are the door
        self._shut = False

    def watch(self, sock: zmq.Socket, path: str | None) -> zmq.Socket:
        """Monitor ``sock``'s connections (``path``: its socket file, if any); returns the
        monitor socket for the loop to poll."""
        if path is not None:
            self.paths.append(path)
        monitor = sock.get_monitor_socket(self.EVENTS)
        monitor.setsockopt(zmq.LINGER, 0)
        self.monitors.append(monitor)
        return monitor

    def drain(self, monitor: zmq.Socket) -> None:
        """Take the monitor's events (on the loop thread)."""
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            fd = event["value"]  # a descriptor, except for a failed handshake (an error code)
            if event["event"] & self.HANDSHAKE_FAILED:
                self._refused_handshake()
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.peers.discard(fd)
            elif len(self.peers) >= self.cap:
                self.refused += 1
                _shut(fd)  # libzmq sees the end of the stream and closes its descriptor
            else:
                self.peers.add(fd)
        if not self._shut and len(self.peers) >= self.gate_at:
            self._door(True)
            self.gated += 1
            log.warning("%d connections: refusing new ones for now", len(self.peers))
        elif self._shut and len(self.peers) <= self.open_at:
            self._door(False)

    def _refused_handshake(self) -> None:
        self.auth_refused += 1
        if self.auth_refused <= 3 or self.auth_refused % 100 == 0:  # a scan must not flood logs
            log.warning(
                "refused a connection: its handshake failed (a client without this daemon's"
                " tcp:// keys, or not speaking CURVE); %d refused so far",
                self.auth_refused,
            )

    def _door(self, shut: bool) -> None:
        self._shut = shut
        for path in self.paths:
            try:
                if shut:
                    os.rename(path, path + ".full")
                else:
                    os.rename(path + ".full", path)
            except OSError as exc:
                log.warning("cannot move the socket file %s: %s", path, exc)

    def close(self) -> None:
        if self._shut:
            self._door(False)  # so that the daemon's cleanup finds its socket files
        for monitor in self.monitors:
            monitor.close(linger=0)
        self.monitors = []

    def stats(self) -> dict[str, Any]:
        return {
            "curr_connections": len(self.peers),
            "connections_refused": self.refused,
            "connections_gated": self.gated,
            "auth_refused": self.auth_refused,
            "limit_connections": self.cap,
        }


def _shut(fd: int) -> None:
    try:
        sock = socket.socket(fileno=fd)  # no dup: at the limit there may be no descriptor free
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()  # the descriptor stays libzmq's

"""Following chains: a thread that takes the blocks the daemon publishes into this process's L1.

Requests for a growing text (a chat) go to workers at random, so a worker's L1 is usually a few
turns behind: the turns in between were encoded by other workers. Asking the daemon for them
costs a round trip on every request (more than encoding a turn). Instead the daemon publishes
every chain block it stores (a PUB socket next to its main one), and each client follows on a
background thread: between requests, the blocks of the other workers' turns arrive, are checked
(``AutoPrefixCache.adopt``: its parent is ours, its cut is recomputed, its tokens spell its
bytes) and stored. A request then finds the chain up to the previous turn in its own L1 and
encodes only the new turn.

The same thread sends the client's TELLs (the blocks it encoded itself, for the daemon to fill
and publish) on a DEALER socket of its own: a send costs a request about 80 us of system calls
and wake-ups on a busy host, and nothing waits for a TELL: the daemon answers one only when it
no longer holds the chain it extends, and the thread passes that on (the next TELL then starts
from the first block). It also records the blocks of the texts this process encoded in its L1
(``later``: ``Chains.catch_up``), so that a request does not wait for that bookkeeping.

A subscriber subscribes to its chain seeds only (the topic is the first frame), so processes
with another namespace, encoding, policy or block size receive nothing of each other's. A
block whose parent is not in this L1 is dropped at once (a chat this worker never served).
Publishing is best effort: a block missed (a restart, a full queue) costs one local encode.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import zmq

from flashtoken.wire import MAX_HEADER_BYTES, MAX_PREFIX_BYTES
from flashtoken.wire.auth import secure_client

__all__ = ["Follower"]

log = logging.getLogger("flashtoken.client")

_RCVHWM = 1024  # messages queued for a busy worker before the publisher drops its share
_MAX_MESSAGE_BYTES = 2 * MAX_PREFIX_BYTES + MAX_HEADER_BYTES  # a span plus its tokens, at most


class Follower:
    """A daemon thread with one SUB socket (``take(frames)`` for every published message) and
    one DEALER socket (``tell(frames)`` sends a TELL; ``answered(frames)`` for its rare reply).

    ``subscribe``, ``tell`` and ``close`` may be called from any thread: they queue a command
    and wake the thread, which alone touches the sockets (a ZeroMQ socket belongs to one thread).
    """

    def __init__(
        self,
        context: zmq.Context,
        address: str,
        publisher: str,
        take: Callable[[list[bytes]], object],
        answered: Callable[[list[bytes]], object],
        configure: Callable[[zmq.Socket, str], None],
    ) -> None:
        self._take = take
        self._answered = answered
        self._commands: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._sock = context.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, _RCVHWM)
        self._sock.setsockopt(zmq.MAXMSGSIZE, _MAX_MESSAGE_BYTES)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        secure_client(self._sock, publisher)  # tcp://: the daemon publishes to CURVE clients only
        self._sock.connect(publisher)
        self._dealer = context.socket(zmq.DEALER)
        configure(self._dealer, address)
        self.received = self.refused = self.told = 0
        self._thread = threading.Thread(target=self._run, name="flashtoken-follow", daemon=True)
        self._thread.start()

    def subscribe(self, seed: bytes) -> None:
        self._commands.put(("subscribe", seed))
        self._wake()

    def tell(self, frames: list[bytes]) -> None:
        """Send ``frames`` to the daemon soon, from the thread; dropped if it is not there."""
        self._commands.put(("tell", frames))
        self._wake()

    def later(self, job: Callable[[], object]) -> None:
        """Run ``job`` soon, on the thread (work a request need not wait for)."""
        self._commands.put(("run", job))
        self._wake()

    def close(self, timeout: float = 1.0) -> None:
        """Stop the thread and close its socket (from any thread but the follower's own)."""
        if self._thread.is_alive():
            self._commands.put(None)
            self._wake()
            self._thread.join(timeout)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # full (the thread will wake anyway) or closed

    def _run(self) -> None:
        try:
            # A low priority for this thread alone (Linux: a thread id is a process id here):
            # waking it must not preempt the request that woke it, on a host with few cores.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        sock = self._sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(self._dealer, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._wake_r in events:
                    os.read(self._wake_r, 4096)
                    while not self._commands.empty():
                        command = self._commands.get()
                        if command is None:
                            return
                        self._do(*command)
                if sock in events:
                    self._drain(sock)
                if self._dealer in events:
                    self._read_answers()
        except zmq.ZMQError as exc:  # the context is gone (interpreter exit): stop quietly
            log.debug("follower stopped: %s", exc)
        finally:
            sock.close(linger=0)
            self._dealer.close(linger=0)
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _do(self, what: str, arg: Any) -> None:
        if what == "subscribe":
            self._sock.setsockopt(zmq.SUBSCRIBE, arg)
            return
        if what == "run":
            try:
                arg()
            except Exception:  # a bug of ours must not kill the thread: log, go on
                log.exception("a deferred job failed")
            return
        try:
            self._dealer.send_multipart(arg, zmq.NOBLOCK)
            self.told += 1
        except zmq.Again:
            pass  # no daemon connected (IMMEDIATE), or its queue is full: it misses this text

    def _read_answers(self) -> None:
        """A TELL is answered only when the daemon lacks its parent block (``answered``)."""
        while True:
            try:
                self._answered(self._dealer.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return

    def _drain(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.received += 1
            try:
                if not self._take(frames):
                    self.refused += 1
            except Exception:  # a bug of ours must not kill the thread: count, log, go on
                self.refused += 1
                log.exception("a published message could not be taken")

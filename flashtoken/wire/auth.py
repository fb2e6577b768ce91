"""Authentication for ``tcp://``: CURVE keys in a private file, checked by a ZAP handler.

An ``ipc://`` socket is a file that only its owner can open (addresses.py). TCP has no owner:
on ``tcp://127.0.0.1`` every local user can connect, and one could even bind the port first
and pose as the daemon. So on every ``tcp://`` address the daemon is a ZeroMQ CURVE server,
and each client socket a CURVE client, with the keys of one file, ``{runtime_dir}/tcp.key``
(mode 0600, in the user's private directory; ``FLASHTOKEN_TCP_KEY_FILE`` names another, e.g.
one copied to the clients of a remote daemon). The daemon writes it on its first start. It
holds two key pairs::

    server-public <z85>    the clients check the daemon with it: no one else can answer them
    server-secret <z85>
    client-public <z85>    the daemon lets in only the client with this one (the ZAP handler)
    client-secret <z85>

A client that cannot read the file never connects (``DaemonUnavailable``, which the clients
answer by encoding locally, exactly); one whose keys are not the daemon's completes no
handshake, its requests time out and it encodes locally too. The daemon counts and logs each
refusal (``auth_refused``, daemon/limits.py). CURVE also encrypts the traffic, so a remote
``tcp://`` is private as well. PLAIN (a password) was rejected: it sends the secret to whoever
listens on the port.

Where ``ipc://`` or ``fcntl`` do not exist (Windows), the default address is
``tcp://127.0.0.1:7417``, and the single-instance lock is the port itself: a second daemon
cannot bind it (libzmq binds exclusively); addresses.py says where that is the case.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
import threading
from typing import Any, NamedTuple

from flashtoken.errors import DaemonUnavailable

from .addresses import runtime_dir

__all__ = [
    "KEY_FILE_ENV",
    "Keys",
    "ZapHandler",
    "key_file",
    "make_keys",
    "read_keys",
    "secure_client",
    "secure_server",
]

log = logging.getLogger("flashtoken.auth")

KEY_FILE_ENV = "FLASHTOKEN_TCP_KEY_FILE"
_FIELDS = ("server-public", "server-secret", "client-public", "client-secret")
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks (ZeroMQ RFC 27)
_LOG_EVERY = 100  # after the first refusals, one line per this many: a scan must not flood logs


class Keys(NamedTuple):
    """The two CURVE key pairs of a key file (z85 bytes, 40 each)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def key_file() -> str:
    """The path of the key file: ``$FLASHTOKEN_TCP_KEY_FILE``, else ``{runtime_dir}/tcp.key``."""
    return os.environ.get(KEY_FILE_ENV) or os.path.join(runtime_dir(), "tcp.key")


def read_keys(path: str) -> Keys:
    """The keys in ``path``, which must be a private regular file of this user.

    Raises DaemonUnavailable saying what is wrong (missing, not private, not a key file).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise DaemonUnavailable(
            f"cannot read the tcp:// key file {path} ({exc.strerror}); the daemon writes it on"
            f" its first start on a tcp:// address; a client elsewhere needs a copy (mode 0600,"
            f" named by ${KEY_FILE_ENV})"
        ) from None
    try:
        st = os.fstat(fd)
        if os.name == "posix" and (st.st_uid != os.geteuid() or st.st_mode & 0o077):
            raise DaemonUnavailable(
                f"the tcp:// key file {path} is not private to uid {os.geteuid()} (uid"
                f" {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): not used; `chmod 600 {path}`"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            text = f.read(4096)
    finally:
        os.close(fd)
    fields = dict(line.split(None, 1) for line in text.splitlines() if line.count(b" ") == 1)
    try:
        keys = Keys(*(fields[name.encode()].strip() for name in _FIELDS))
    except KeyError:
        raise DaemonUnavailable(
            f"{path} is not a flashtoken tcp:// key file (it needs {', '.join(_FIELDS)});"
            " remove it and restart the daemon to write a new one"
        ) from None
    if any(len(k) != 40 for k in keys):
        raise DaemonUnavailable(f"a key in {path} is not 40 z85 characters: not a key file")
    return keys


def make_keys(path: str) -> Keys:
    """The keys in ``path``, written first (fresh, mode 0600) if there is no file there.

    For the daemon, which owns the file. Raises DaemonUnavailable as ``read_keys`` does.
    """
    import zmq

    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    lines = [b"# flashtoken tcp:// CURVE keys (z85): keep this file private"]
    lines += [f"{n} ".encode() + k for n, k in zip(_FIELDS, (
        server_public, server_secret, client_public, client_secret), strict=True)]  # fmt: skip
    # Written whole beside it, then linked into place: a daemon starting at the same moment reads
    # either no file or a complete one, and an existing file (or a planted link) is never replaced.
    partial = f"{path}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(partial, flags, 0o600), "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    try:
        os.link(partial, path)
        log.info("wrote new tcp:// keys to %s", path)
    except FileExistsError:
        pass  # another daemon's, or an earlier one's: those are the keys
    finally:
        os.unlink(partial)
    return read_keys(path)


def secure_client(sock: Any, address: str) -> None:
    """Make ``sock`` a CURVE client of the daemon at a ``tcp://`` address (before connect);
    nothing for another transport. Raises DaemonUnavailable if the key file is unusable."""
    if not address.startswith("tcp://"):
        return
    import zmq

    keys = read_keys(key_file())
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret)


def secure_server(sock: Any, address: str, keys: Keys | None) -> None:
    """Make ``sock`` a CURVE server with ``keys`` (before bind) on a ``tcp://`` address."""
    if not address.startswith("tcp://") or keys is None:
        return
    import zmq

    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, b"flashtoken")


class ZapHandler:
    """The daemon's ZAP handler: lets in the client key of the key file, refuses the rest.

    libzmq asks it about every CURVE handshake that got past the server's own key check (a
    client that knows the daemon's public key); a client without it is dropped by libzmq before.
    A thread of its own with a REP socket on the context's ZAP endpoint: the daemon's poll loop
    is not held up by handshakes. Started before any CURVE socket binds, stopped before the
    context is terminated (``stop``)."""

    def __init__(self, context: Any, keys: Keys) -> None:
        import zmq

        self.refused = 0  # counted for the log's pace; the daemon's count is its monitor's
        from zmq.utils import z85

        self._client = z85.decode(keys.client_public)  # ZAP passes the raw 32 bytes
        self._sock = context.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(_ZAP_ENDPOINT)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flashtoken-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import zmq

        try:
            while not self._stopping.is_set():
                if not self._sock.poll(100):
                    continue
                self._sock.send_multipart(self._answer(self._sock.recv_multipart()))
        except zmq.ZMQError as exc:  # the context went away under us: nothing left to guard
            log.debug("ZAP handler stopped: %s", exc)
        finally:
            self._sock.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        """A ZAP reply (version, request id, status, text, user id, metadata)."""
        if len(frames) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, peer, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        if (
            version == b"1.0"
            and mechanism == b"CURVE"
            and len(credentials) == 1
            and hmac.compare_digest(credentials[0], self._client)
        ):
            return [b"1.0", request_id, b"200", b"OK", b"flashtoken", b""]
        self.refused += 1
        if self.refused <= 3 or self.refused % _LOG_EVERY == 0:
            log.info(  # the warning is the monitor's (daemon/limits.py): this line adds the peer
                "refused a %s connection from %s: its key is not the one in the tcp:// key"
                " file (%d refused so far)",
                mechanism.decode("ascii", "replace"),
                peer.decode("ascii", "replace") or "?",
                self.refused,
            )
        return [b"1.0", request_id, b"400", b"unknown client key", b"", b""]

    def stop(self, timeout: float = 2.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

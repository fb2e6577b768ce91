"""Addresses and the directory policy: where the daemon binds, and who may be the daemon.

The default socket lives in a per-user directory that must be private (mode 0700, ours, no
symlink); a client connects only to an ``ipc://`` socket that only its own user can have made.
"""

from __future__ import annotations

import getpass
import os
import re
import stat
import tempfile

from flashtoken.errors import DaemonUnavailable


def runtime_dir(*, create: bool = True) -> str:
    """The per-user directory of the default socket, checked to be private.

    ``$XDG_RUNTIME_DIR/flashtoken`` when ``XDG_RUNTIME_DIR`` is set and writable, else
    ``{tempdir}/flashtoken-{uid}``; created with mode 0700. Where there is no uid (Windows:
    no ``os.getuid``), ``{tempdir}/flashtoken-{user name}``: the temp directory is the user's own.

    Raises ``PermissionError`` if the directory exists but is not ours, is a symlink, or can be
    used by the group or others: a socket in it could be replaced by another user.
    """
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
        path = os.path.join(base, "flashtoken")
    else:
        uid = user_id(effective=False)
        tag = str(uid) if uid is not None else _user_name()
        path = os.path.join(tempfile.gettempdir(), f"flashtoken-{tag}")
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    check_private_dir(path)
    return path


def user_id(*, effective: bool = True) -> int | None:
    """This process's (effective) uid; None on a platform without one (Windows), where a
    file's owner and mode bits say nothing (``st_uid`` is 0): access there is the ACL's, and
    the default directory is in the user's own temp directory."""
    if _pretending(PRETEND_NO_GETUID_ENV) or not hasattr(os, "geteuid"):
        return None
    return os.geteuid() if effective else os.getuid()


def _user_name() -> str:
    """The login name, as a file name's part (``flashtoken-{name}``)."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid, no USERNAME
        name = ""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "user"


def check_private_dir(path: str) -> None:
    """Raise ``PermissionError`` unless ``path`` is a real directory of ours, mode 0o700 or less
    (with no uid, as on Windows: a real directory)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a directory (a symlink?); remove it and retry")
    me = user_id(effective=False)
    if me is None:
        return
    if st.st_uid != me:
        raise PermissionError(
            f"{path} belongs to uid {st.st_uid}, not to us (uid {me}); another user may"
            " control the socket in it. Remove it, or pass --bind / address= elsewhere."
        )
    if st.st_mode & 0o077:
        raise PermissionError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):o}; other users could reach the socket."
            f" Run `chmod 700 {path}`, or remove it."
        )


def check_daemon_socket(address: str) -> None:
    """Check, before connecting, that only our own user can be the daemon at ``address``.

    For ``ipc://``: the socket file must be a socket owned by us (the effective uid) with no
    permission for the group or others, in a directory owned by us or root that no one else can
    write to (so no other user can have replaced the socket). Other transports are not checked
    here (TCP is only ever used when asked for, and has no owner).

    Raises ``DaemonUnavailable`` saying what is wrong: the client then encodes locally.
    """
    path = ipc_path(address)
    if path is None:
        return
    directory = os.path.dirname(path) or "."
    try:
        st = os.lstat(path)
        dst = os.lstat(directory)
    except OSError as exc:
        raise DaemonUnavailable(
            f"no flashtoken-daemon socket at {address} ({exc.strerror}); start one with"
            " `flashtoken-daemon serve`"
        ) from None
    me = user_id()
    if me is None:
        return  # no owner or mode to check (Windows): the directory's ACL decides who binds
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != me or st.st_mode & 0o077:
        raise DaemonUnavailable(
            f"{path} is not a private socket of uid {me} (uid {st.st_uid}, mode"
            f" {stat.S_IMODE(st.st_mode):o}): not trusted as the daemon; start the daemon as"
            " this user (it makes its socket 0600)"
        )
    if not stat.S_ISDIR(dst.st_mode) or dst.st_uid not in (me, 0) or dst.st_mode & 0o022:
        raise DaemonUnavailable(
            f"{directory} (uid {dst.st_uid}, mode {stat.S_IMODE(dst.st_mode):o}) may be written"
            " by another user, who could replace the daemon's socket: not trusted; use a"
            " directory of this user's with mode 0700"
        )


DEFAULT_TCP_ADDRESS = "tcp://127.0.0.1:7417"  # where ipc:// or its lock do not exist
# Make this platform behave as one without ipc:// or fcntl (Windows), for tests on Linux.
PRETEND_NO_IPC_ENV = "FLASHTOKEN_PRETEND_NO_IPC"
PRETEND_NO_FCNTL_ENV = "FLASHTOKEN_PRETEND_NO_FCNTL"
PRETEND_NO_GETUID_ENV = "FLASHTOKEN_PRETEND_NO_GETUID"  # no os.getuid / os.geteuid (Windows)


def _pretending(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def ipc_available() -> bool:
    """Whether ``ipc://`` works here (libzmq has it, and no test pretends otherwise)."""
    if _pretending(PRETEND_NO_IPC_ENV):
        return False
    import zmq

    return bool(zmq.has("ipc"))


def fcntl_available() -> bool:
    """Whether ``fcntl.flock`` exists here: the ipc socket's single-instance lock, else a
    loopback port held for the daemon's life (daemon/binding.py)."""
    if _pretending(PRETEND_NO_FCNTL_ENV):
        return False
    try:
        import fcntl  # noqa: F401
    except ImportError:
        return False
    return True


def default_address() -> str:
    """``ipc://{runtime_dir()}/daemon.sock``: where the daemon binds and clients connect.

    Where ``ipc://`` or ``fcntl`` do not exist, as on Windows, ``tcp://127.0.0.1:7417`` instead,
    authenticated with CURVE keys (flashtoken/wire/auth.py): without fcntl an ipc:// daemon is
    still possible when asked for (``--bind``), locked by a port, but without a uid its socket
    file's owner cannot be checked, which is what makes the default ipc:// address safe."""
    if not (ipc_available() and fcntl_available()):
        return DEFAULT_TCP_ADDRESS
    return "ipc://" + os.path.join(runtime_dir(), "daemon.sock")


def publish_address(address: str) -> str | None:
    """Where a daemon bound at ``address`` publishes its new chain blocks: the ipc path with
    ``.pub`` appended, or the next TCP port; None for any other transport (no publishing).

    >>> publish_address("ipc:///run/user/1000/flashtoken/daemon.sock")
    'ipc:///run/user/1000/flashtoken/daemon.sock.pub'
    >>> publish_address("tcp://127.0.0.1:7000")
    'tcp://127.0.0.1:7001'
    """
    if address.startswith("ipc://"):
        return address + ".pub"
    host, sep, port = address.rpartition(":")
    if address.startswith("tcp://") and sep and port.isdigit() and int(port) < 65535:
        return f"{host}:{int(port) + 1}"
    return None


def ipc_path(address: str) -> str | None:
    """The filesystem path of an ``ipc://`` address, else None."""
    return address[len("ipc://") :] if address.startswith("ipc://") else None

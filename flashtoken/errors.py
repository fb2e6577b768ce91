"""The errors FlashToken raises.

A shallow tree, so callers can catch as broadly or as narrowly as they need::

    FlashTokenError
    ├── EncodingUnavailable(FlashTokenError, LookupError)   no BPE file could be loaded
    ├── ProtocolError(FlashTokenError, ValueError)           a malformed or out-of-range frame
    └── DaemonError(FlashTokenError)                        the sidecar answered with an error
        └── DaemonUnavailable(DaemonError, ConnectionError) the sidecar is not there
            └── DaemonTimeout(DaemonUnavailable, TimeoutError)  ... or did not answer in time

Invalid arguments raise the built-in ``TypeError`` / ``ValueError``, and a disallowed special
token raises tiktoken's own ``ValueError``, unchanged: FlashToken gives no error a new meaning.
The encode paths of the client never raise the daemon errors: they fall back to local encoding.
"""

from __future__ import annotations


class FlashTokenError(Exception):
    """Base class of every error FlashToken defines."""


class EncodingUnavailable(FlashTokenError, LookupError):
    """No BPE file could be found or downloaded for an encoding."""


class ProtocolError(FlashTokenError, ValueError):
    """A wire message is malformed, too large, of the wrong version or out of range."""


class DaemonError(FlashTokenError):
    """The daemon answered a request with an error reply."""


class DaemonUnavailable(DaemonError, ConnectionError):
    """The daemon could not be reached."""


class DaemonTimeout(DaemonUnavailable, TimeoutError):
    """The daemon did not answer within the client's time budget."""

"""FlashToken: tiktoken's exact token ids for long, repeated prompt prefixes, encoded once.

This is the public API of the core library. The ZeroMQ sidecar and its client live in
``flashtoken.daemon`` and ``flashtoken.client`` and are imported only when asked for.
"""

from flashtoken.auto import AutoPrefixCache
from flashtoken.conversation import AppendOnlyPieceTokenCache
from flashtoken.encodings import get_encoding
from flashtoken.errors import (
    DaemonError,
    DaemonTimeout,
    DaemonUnavailable,
    EncodingUnavailable,
    FlashTokenError,
    ProtocolError,
)
from flashtoken.prefix import FixedPrefixTokenCache, PrefixSplit, TokenDelta, split_prefix

__version__ = "0.1.0"


def _find_checkout_subpackages() -> None:
    """In a source checkout, find ``flashtoken.client`` and ``flashtoken.daemon`` in the
    checkout's ``client/`` and ``daemon/``, as the installed package finds them.

    Run from the repository's root (``python -c``, ``python -m``, gunicorn with the examples),
    this ``flashtoken/`` comes first on ``sys.path`` and shadows an installed (non-editable)
    copy, while ``client/`` and ``daemon/`` sit beside it rather than inside (pyproject's
    package-dir mapping): ``import flashtoken.client`` failed. Adding the root to this
    package's ``__path__`` finds them, and keeps core, client and daemon from the same tree.
    Rejected: moving client/ and daemon/ into flashtoken/ (against the chosen layout) and a
    src/ layout (every path in the docs, the Makefile and the tests would move). Nothing
    changes for an installed copy: its parent directory is site-packages, with no pyproject.
    """
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    markers = ("pyproject.toml", "client/__init__.py", "daemon/__init__.py")
    if root not in __path__ and all(os.path.isfile(os.path.join(root, m)) for m in markers):
        __path__.append(root)


_find_checkout_subpackages()

__all__ = [
    "AppendOnlyPieceTokenCache",
    "AutoPrefixCache",
    "DaemonError",
    "DaemonTimeout",
    "DaemonUnavailable",
    "EncodingUnavailable",
    "FixedPrefixTokenCache",
    "FlashTokenError",
    "PrefixSplit",
    "ProtocolError",
    "TokenDelta",
    "get_encoding",
    "split_prefix",
    "__version__",
]

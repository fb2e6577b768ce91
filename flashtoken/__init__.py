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

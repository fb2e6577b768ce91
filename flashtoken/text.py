"""The check every public entry point makes of the text it is given, written once.

tiktoken raises a ``TypeError`` of its own deep inside an encode for a non-str; FlashToken checks
first, so that the message names the argument (``prefix``, ``suffix``, ``text``) and no cache is
touched. Shared by the core (flashtoken/prefix.py, auto.py, conversation.py) and the clients.

>>> require_str("hello", "text")
>>> require_str(b"hello", "prefix")
Traceback (most recent call last):
    ...
TypeError: prefix must be a str, not bytes
"""

from __future__ import annotations

__all__ = ["require_str"]


def require_str(value: object, name: str) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is a str."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")

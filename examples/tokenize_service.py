"""What the WSGI and the ASGI example share: reading a /tokenize request, and the JSON replies.

Not a framework: the apps in gunicorn/app.py and asgi/app.py call ``parse`` on the body and
``reply`` on what they computed. No FlashToken call is made here.

Request: ``POST /tokenize`` with ``{"encoding": "cl100k_base", "prefix": "...", "suffix": "...",
"allowed_special": "all" | ["<|endoftext|>", ...]}`` (``encoding`` and ``allowed_special``
optional). The tokens are ``enc.encode(prefix + suffix, allowed_special=...)``: a special token's
text that is not allowed is refused with tiktoken's own message, as tiktoken would.
``POST /tokenize?return=count`` answers ``{"count": n, "source": ...}`` instead of the list.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_ENCODING = "cl100k_base"
# Only these: a request naming another encoding must not make the server download or build one.
ENCODINGS = tuple(
    e.strip()
    for e in os.environ.get(
        "FLASHTOKEN_EXAMPLE_ENCODINGS", "cl100k_base,o200k_base,o200k_harmony"
    ).split(",")
    if e.strip()
)
# "sidecar": FlashToken's client (in-process L1, the shared daemon, local fallback).
# "tiktoken": the same app encoding prefix + suffix with tiktoken on every request (the baseline).
STRATEGY = os.environ.get("FLASHTOKEN_EXAMPLE_STRATEGY", "sidecar")
if STRATEGY not in ("sidecar", "tiktoken"):
    raise SystemExit(f"FLASHTOKEN_EXAMPLE_STRATEGY must be sidecar or tiktoken, not {STRATEGY!r}")


class BadRequest(ValueError):
    """The request is unusable; the message goes back to the caller with a 400."""


@dataclass(frozen=True)
class TokenizeRequest:
    encoding: str
    prefix: str
    suffix: str
    allowed_special: str | frozenset  # "all" or a set of special-token strings


def parse(body: bytes) -> TokenizeRequest:
    """The request in ``body``; raises BadRequest with a message saying what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    unknown = set(data) - {"encoding", "prefix", "suffix", "allowed_special"}
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    encoding = data.get("encoding", DEFAULT_ENCODING)
    if not isinstance(encoding, str):
        raise BadRequest("'encoding' must be a string")
    if encoding not in ENCODINGS:
        raise BadRequest(
            f"unknown encoding {encoding!r}; this server serves: {', '.join(ENCODINGS)}"
        )
    for name in ("prefix", "suffix"):
        if not isinstance(data.get(name), str):
            raise BadRequest(f"'{name}' must be a string (it is required)")
    allowed: Any = data.get("allowed_special", [])
    if allowed != "all":
        if not isinstance(allowed, list) or not all(isinstance(s, str) for s in allowed):
            raise BadRequest("'allowed_special' must be \"all\" or a list of strings")
        allowed = frozenset(allowed)
    return TokenizeRequest(encoding, data["prefix"], data["suffix"], allowed)


def wants_count(query_string: str) -> bool:
    return "return=count" in query_string.split("&")


def reply(status: int, payload: dict) -> tuple[int, bytes]:
    return status, json.dumps(payload, separators=(",", ":")).encode()


def error(status: int, message: str) -> tuple[int, bytes]:
    return reply(status, {"error": message})


def metrics() -> tuple[int, bytes, str]:
    """``GET /metrics``: every worker's client counters in Prometheus's text format, summed over
    the workers (``hooks(prometheus=True)`` in the gunicorn configs); a 404 saying what to
    install without prometheus-client."""
    try:
        from flashtoken.client.prometheus import metrics_response

        body, content_type = metrics_response()
    except ModuleNotFoundError as exc:
        return (*error(404, str(exc)), "application/json")
    return 200, body, content_type


def source_of(before: dict, after: dict) -> str:
    """Where an answer came from, from the client's counters around the call.

    ``l1``: this worker's in-process cache; ``daemon``: the shared daemon had the prefix;
    ``local``: this worker encoded the prefix itself (first sight, daemon miss or down).
    Exact for one request at a time (sync workers); under concurrency (asyncio, threads) another
    request's counters may land in between, so treat it as a hint there.
    """
    if after.get("l1_hits", 0) > before.get("l1_hits", 0):
        return "l1"
    if after.get("l2_hits", 0) > before.get("l2_hits", 0):
        return "daemon"
    return "local"


STATUS_TEXT = {
    200: "200 OK",
    400: "400 Bad Request",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    413: "413 Payload Too Large",
    500: "500 Internal Server Error",
}

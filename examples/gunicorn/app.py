"""A WSGI app: ``POST /tokenize`` and ``GET /stats``, tokens from FlashToken's sidecar.

    gunicorn -c examples/gunicorn/gunicorn.conf.py

    curl -s localhost:8000/tokenize -d '{"prefix": "You are a helpful assistant.", "suffix": " Hi"}'
    {"tokens":[2675,527,264,11190,18328,13,21694],"source":"local"}

Every worker gets its client from the gunicorn hooks (``post_fork``); ``get_client`` returns it.
The tokens are tiktoken's, exactly, whatever the daemon does. See examples/tokenize_service.py
for the request format and docs/INTEGRATION.md for the set-up.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/tokenize_service.py

from flashtoken.client.gunicorn import get_client  # noqa: E402
from tokenize_service import (  # noqa: E402
    MAX_BODY_BYTES,
    STATUS_TEXT,
    STRATEGY,
    BadRequest,
    error,
    metrics,
    parse,
    reply,
    source_of,
    wants_count,
)

import flashtoken  # noqa: E402


def tokenize(body: bytes, count_only: bool) -> tuple[int, bytes]:
    try:
        req = parse(body)
    except BadRequest as exc:
        return error(400, str(exc))
    try:
        if STRATEGY == "tiktoken":
            enc = flashtoken.get_encoding(req.encoding)
            tokens = enc.encode(req.prefix + req.suffix, allowed_special=req.allowed_special)
            source = "tiktoken"
        else:
            client = get_client(req.encoding)
            before = client.stats()
            if count_only:
                n = client.count(req.suffix, prefix=req.prefix, allowed_special=req.allowed_special)
            else:
                tokens = client.encode(
                    req.suffix, prefix=req.prefix, allowed_special=req.allowed_special
                )
            source = source_of(before, client.stats())
    except ValueError as exc:  # tiktoken's: a special token's text that is not allowed
        return error(400, str(exc))
    if count_only:
        return reply(200, {"count": n if STRATEGY != "tiktoken" else len(tokens), "source": source})
    return reply(200, {"tokens": tokens, "source": source})


def stats() -> tuple[int, bytes]:
    out: dict = {"pid": os.getpid(), "strategy": STRATEGY}
    if STRATEGY == "sidecar":
        client = get_client()
        out["client"] = client.stats()
        try:
            out["daemon"] = client.daemon_stats(timeout_ms=500)
        except flashtoken.DaemonError as exc:
            out["daemon"] = None
            out["daemon_error"] = str(exc)
    return reply(200, out)


def app(environ: dict, start_response) -> list[bytes]:
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    content_type = "application/json"
    if path == "/tokenize":
        if method != "POST":
            status, body = error(405, "use POST")
        else:
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY_BYTES:
                status, body = error(413, f"body must be 0..{MAX_BODY_BYTES} bytes")
            else:
                status, body = tokenize(
                    environ["wsgi.input"].read(length), wants_count(environ.get("QUERY_STRING", ""))
                )
    elif path == "/stats":
        status, body = stats() if method == "GET" else error(405, "use GET")
    elif path == "/metrics":
        status, body, content_type = (
            metrics() if method == "GET" else (*error(405, "use GET"), content_type)
        )
    else:
        status, body = error(404, "not found: POST /tokenize, GET /stats or GET /metrics")
    start_response(
        STATUS_TEXT[status],
        [("Content-Type", content_type), ("Content-Length", str(len(body)))],
    )
    return [body]

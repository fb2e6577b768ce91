"""An ASGI app (plain ASGI 3, no framework): ``POST /tokenize`` and ``GET /stats``.

    gunicorn -c examples/asgi/gunicorn.conf.py              # 4 uvicorn workers + the daemon
    uvicorn --app-dir examples/asgi app:app --workers 4      # no hooks: run the daemon yourself

Under gunicorn every worker gets an ``AsyncClient`` from the hooks (``post_fork``); under plain
uvicorn ``get_async_client`` makes one per process on first use, for the daemon at
``$FLASHTOKEN_ADDRESS`` (default: the daemon's default address). The same request format as the
WSGI example (examples/tokenize_service.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/tokenize_service.py

from flashtoken.client.gunicorn import close_clients, get_async_client  # noqa: E402
from tokenize_service import (  # noqa: E402
    MAX_BODY_BYTES,
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


async def tokenize(body: bytes, count_only: bool) -> tuple[int, bytes]:
    try:
        req = parse(body)
    except BadRequest as exc:
        return error(400, str(exc))
    try:
        if STRATEGY == "tiktoken":
            enc = flashtoken.get_encoding(req.encoding)
            tokens = enc.encode(req.prefix + req.suffix, allowed_special=req.allowed_special)
            n, source = len(tokens), "tiktoken"
        else:
            client = get_async_client(req.encoding)
            before = client.stats()
            if count_only:
                n = await client.count(
                    req.suffix, prefix=req.prefix, allowed_special=req.allowed_special
                )
            else:
                tokens = await client.encode(
                    req.suffix, prefix=req.prefix, allowed_special=req.allowed_special
                )
            source = source_of(before, client.stats())  # a hint: other tasks run during await
    except ValueError as exc:  # tiktoken's: a special token's text that is not allowed
        return error(400, str(exc))
    if count_only:
        return reply(200, {"count": n, "source": source})
    return reply(200, {"tokens": tokens, "source": source})


async def stats() -> tuple[int, bytes]:
    out: dict = {"pid": os.getpid(), "strategy": STRATEGY}
    if STRATEGY == "sidecar":
        client = get_async_client()
        out["client"] = client.stats()
        try:
            out["daemon"] = await client.daemon_stats(timeout_ms=500)
        except flashtoken.DaemonError as exc:
            out["daemon"], out["daemon_error"] = None, str(exc)
    return reply(200, out)


async def read_body(receive) -> bytes | None:
    """The request body, or None once it grows past MAX_BODY_BYTES."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            close_clients()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    if scope["type"] != "http":
        return None
    method, path = scope["method"], scope["path"]
    content_type = "application/json"
    if path == "/tokenize":
        if method != "POST":
            status, body = error(405, "use POST")
        else:
            data = await read_body(receive)
            if data is None:
                status, body = error(413, f"body must be at most {MAX_BODY_BYTES} bytes")
            else:
                query = scope.get("query_string", b"").decode()
                status, body = await tokenize(data, wants_count(query))
    elif path == "/stats":
        status, body = await stats() if method == "GET" else error(405, "use GET")
    elif path == "/metrics":
        status, body, content_type = (
            metrics() if method == "GET" else (*error(405, "use GET"), content_type)
        )
    else:
        status, body = error(404, "not found: POST /tokenize, GET /stats or GET /metrics")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

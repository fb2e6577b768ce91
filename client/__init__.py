"""The worker-side client of ``flashtoken-daemon``: ``Client`` (blocking) and ``AsyncClient``.

>>> from flashtoken.client import Client
>>> with Client(encoding="cl100k_base") as client:
...     client.encode_ordinary(" Answer briefly.", prefix="You are a helpful assistant.")
[2675, 527, 264, 11190, 18328, 13, 22559, 27851, 13]

Every answer is tiktoken's, whether or not a daemon runs. Needs the ``[daemon]`` extra
(pyzmq, msgpack): ``pip install 'flashtoken[daemon]'``.
"""

try:
    from .aio import AsyncClient
    from .sync import Client
except ModuleNotFoundError as exc:  # say which extra, not only "No module named 'zmq'"
    if exc.name not in ("zmq", "msgpack", "xxhash"):
        raise
    raise ModuleNotFoundError(
        f"flashtoken.client needs {exc.name}, which the [daemon] extra installs:"
        " pip install 'flashtoken[daemon]'",
        name=exc.name,
    ) from exc

__all__ = ["AsyncClient", "Client"]

"""The worker-side client of ``flashtoken-daemon``: ``Client`` (blocking) and ``AsyncClient``.

>>> from flashtoken.client import Client
>>> with Client(encoding="cl100k_base") as client:
...     client.encode_ordinary(" Answer briefly.", prefix="You are a helpful assistant.")
[2675, 527, 264, 11190, 18328, 13, 22559, 27851, 13]

Every answer is tiktoken's, whether or not a daemon runs.
"""

from .aio import AsyncClient
from .sync import Client

__all__ = ["AsyncClient", "Client"]

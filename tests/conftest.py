"""Shared test settings.

hypothesis runs a modest number of examples by default; set FLASHTOKEN_HYPOTHESIS_EXAMPLES to
run the long randomized search (e.g. 200000 per property: millions of cases in all).
"""

import os

import pytest
from hypothesis import HealthCheck, settings

from flashtoken import get_encoding

# A client starting takes the host's hot prefixes into its L1 (preload_bytes): a test naming the
# path a request takes (the map, the daemon, a first sight) would race with the daemon's hot
# list, rewritten within a second or two. Off for the suite (and the processes it starts);
# tests/test_preload.py and the gunicorn recycling test turn it on.
os.environ["FLASHTOKEN_PRELOAD_BYTES"] = "0"

# The real-daemon fixtures (start_daemon, daemon, shared_daemon), owned by the sidecar's tests.
pytest_plugins = ["tests.daemon_fixtures"]

settings.register_profile(
    "flashtoken",
    max_examples=int(os.environ.get("FLASHTOKEN_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("flashtoken")

ENCODINGS = ["cl100k_base", "o200k_base", "o200k_harmony"]


@pytest.fixture(params=ENCODINGS, scope="session")
def enc(request):
    return get_encoding(request.param)

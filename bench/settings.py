"""Project settings plus the benchmark's URLs (the constant-body floor view)."""

from __future__ import annotations

from autopack_site.settings import *  # noqa: F403
from autopack_site.settings import REST_FRAMEWORK

ROOT_URLCONF = "bench.urls"

# The status load figure polls with one token at thousands of requests a second, which the
# per-user throttle (AUTOPACK_API_RATE, 600/minute by default) would answer with 429 within
# the first second. Its rate is lifted far above the load instead of switching it off, so
# every request is still counted and the throttle's cost is part of the figure.
REST_FRAMEWORK = {
    **REST_FRAMEWORK,
    "DEFAULT_THROTTLE_RATES": {
        **REST_FRAMEWORK.get("DEFAULT_THROTTLE_RATES", {}),
        "user": "1000000000/minute",
    },
}

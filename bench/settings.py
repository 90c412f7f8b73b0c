"""Project settings plus the benchmark's URLs (the constant-body floor view)."""

from __future__ import annotations

from autopack_site.settings import *  # noqa: F403
from autopack_site.settings import REST_FRAMEWORK

ROOT_URLCONF = "bench.urls"

# DRF's per-user throttle (AUTOPACK_API_RATE, 600/minute by default) would refuse a load test
# from one token within a second, and lifting its rate instead makes it slower than the view:
# DRF keeps every request of the window in one cached list, copied on each request. So the
# benchmark turns it off (rate None) and says so in docs/benchmarks.md.
REST_FRAMEWORK = {
    **REST_FRAMEWORK,
    "DEFAULT_THROTTLE_RATES": {**REST_FRAMEWORK.get("DEFAULT_THROTTLE_RATES", {}), "user": None},
}

"""The environment that points a process's providers at a running simulator."""

from __future__ import annotations


def simulated_provider_env(url: str) -> dict[str, str]:
    """Environment that points every provider at the simulated provider at `url`, with fake
    keys (for `make run`, the tests and the benchmarks; production sets real base URLs and
    keys). Each provider gets its own URL prefix, which is how the simulator picks its wire
    protocol (server.ROUTES). A running simulator also serves this at GET /_sim/env, so a
    process can learn it without importing this package."""
    return {
        "AUTOPACK_OPENAI_BASE_URL": f"{url}/openai/v1",
        "AUTOPACK_ANTHROPIC_BASE_URL": f"{url}/anthropic",
        "AUTOPACK_GOOGLE_GEMINI_BASE_URL": f"{url}/gemini/",
        "AUTOPACK_GLM_BASE_URL": f"{url}/glm/api/paas/v4",
        "OPENAI_API_KEY": "sim-openai-key",
        "ANTHROPIC_API_KEY": "sim-anthropic-key",
        "GEMINI_API_KEY": "sim-gemini-key",
        "GLM_API_KEY": "sim-glm-key",
        # Admin keys for the usage APIs it serves (usage_api.py): the demo's reconciliation.
        "OPENAI_ADMIN_KEY": "sk-admin-sim-openai-key",
        "ANTHROPIC_ADMIN_KEY": "sk-ant-admin01-sim-anthropic-key",
    }

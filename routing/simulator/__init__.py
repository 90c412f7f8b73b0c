"""The simulated LLM provider: a local HTTP server speaking the OpenAI, Anthropic, Gemini and
GLM wire formats, so the demo and the tests reach it through the real SDKs (DESIGN.md,
"Processes"). Run it with `python -m routing.simulator --port 0`.

Control API (JSON, no auth): POST /_sim/config, /_sim/faults, /_sim/script, /_sim/reset;
GET /_sim/requests, /_sim/config, /_sim/rules, /_sim/health. See server.py.
"""

from __future__ import annotations

"""The simulated LLM provider: a local HTTP server speaking the OpenAI, Anthropic, Gemini and
GLM wire formats, so the demo and the tests reach it through the real SDKs (DESIGN.md,
"Processes"). Run it with `python -m simulator --port 0`; it prints one line,
`simulated provider listening on http://HOST:PORT`.

Development tooling only: no production module (autopack_site, usage, routing, runs) imports
it. `make run` starts it as a child process and learns its environment from GET /_sim/env.

Layout: server.py (HTTP, faults, log) dispatches each model call by its URL prefix to one wire
module per protocol (wire/openai.py for OpenAI, GLM and OpenAI-compatible servers,
wire/anthropic.py, wire/gemini.py); content.py decides the reply text and token counts,
project.py the simulated builder's edits, state.py the rules and the log.

Replies are shaped like the real APIs' (each wire module's docstring says how): the model the
reply names is the dated snapshot the real API reports (`gpt-5` → `gpt-5-2025-08-07`,
`claude-sonnet-4-5` → `claude-sonnet-4-5-20250929`, Gemini's `modelVersion`; GLM and unknown
models echo the name); usage carries cache reads, Anthropic's 5-minute and 1-hour cache writes,
reasoning/thinking, OpenAI prediction tokens and Gemini tool-use prompt tokens.

Control API (JSON, no auth):

- POST /_sim/config {delay, revise_rate, seed, edit_miss_rate, edit_malformed_rate,
  check_fail_rate}; GET /_sim/config.
- POST /_sim/faults {kind, count=1 (-1: until reset), provider, match, role, ...}: the next
  matching call fails. kind:
  - `429` (`retry_after`), `500`, `insufficient_quota`, `auth`, `bad_request`: the provider's
    error body and status (`message` replaces its wording);
  - `hang` (`hang_seconds`): the reply waits that long first;
  - `malformed`: a 200 whose body (or one stream event) is not valid JSON;
  - `cut_stream`: the connection drops part-way. A stream sends its head, then `after`
    content frames (default: half of them, at least one), and never its tail, so:
    Anthropic after `message_start` (the client saw the input and cache tokens, no
    `message_delta`); Gemini after some chunks, each with its cumulative `usageMetadata`, never
    the final one; OpenAI and GLM mid-content, before the finish chunk and any usage. A
    non-streamed reply is cut in the middle of its body. The log entry's `partial_usage` is
    the last usage the client was sent before the cut (None when there was none).
- POST /_sim/script {text | verdict | cache_ttl, count, provider, match, role}: the next
  matching call answers `text` (or the auditor `verdict` as JSON); `cache_ttl: "1h"` puts its
  cache writes in Anthropic's 1-hour cache (a request's own `cache_control` `ttl` does too).
- POST /_sim/other_usage {provider: openai|anthropic, model, input_tokens, output_tokens,
  cached_tokens, cache_write_tokens, cache_write_1h_tokens, requests, at}: usage "from other
  tools" that the usage APIs report but no call was answered for (usage_api.py).
- GET <openai prefix>/v1/organization/usage/completions and GET <anthropic
  prefix>/v1/organizations/usage_report/messages: the providers' usage APIs (admin keys), in step
  with every call answered 200 (usage_api.py); a fault rule with `role: "usage_api"` hits only
  them.
- POST /_sim/release: the responses sleeping out a delay or a hang answer now (a test holds a
  call open with a long delay and ends it on the event it waits for).
- POST /_sim/reset: the startup config, no rules, an empty log.
- GET /_sim/requests (the request log of model calls: provider, model asked for,
  reported_model, role, usage exactly as sent, partial_usage, outcome…),
  /_sim/usage_requests (the usage API reads, role "usage_api"), /_sim/rules, /_sim/env,
  /_sim/health.
"""

from __future__ import annotations

from .env import simulated_provider_env

__all__ = ["simulated_provider_env"]

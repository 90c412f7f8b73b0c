# The two set-up commands of the README: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Tests use PostgreSQL and Redis (CI and the README's set-up); override to point elsewhere.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/autopack
TEST_BROKER_URL   ?= redis://127.0.0.1:6379/15

.PHONY: install browser sandbox run test lint format demo clean bench bench-smoke

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Debian's Chromium for the browser tests (Playwright drives it; no browser is downloaded).
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "no /usr/bin/chromium: the browser tests skip (sudo apt-get install chromium)"; fi

## Debian's bubblewrap: the sandbox a plan's checks run in (runs/sandbox.py). Without it checks
## are not run unless AUTOPACK_ALLOW_UNSANDBOXED_CHECKS=true (see the README).
sandbox:
	@if command -v bwrap >/dev/null || [ -x /usr/bin/bwrap ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's bubblewrap for the checks' sandbox"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	else echo "no bubblewrap (bwrap): checks will not run until it is installed" \
		"(sudo apt-get install bubblewrap; other systems: the bubblewrap package)," \
		"or AUTOPACK_ALLOW_UNSANDBOXED_CHECKS=true runs them without a sandbox"; fi

## make run: web + worker + beat + simulated provider, SQLite and a file broker under .autopack/
run: install sandbox
	$(BIN)/python manage.py devstack

## make demo: start the example plan (with `make run` going in another terminal)
demo: install
	$(BIN)/python manage.py start_run examples/plan.yaml

## make test: the whole suite against PostgreSQL, Redis, real Celery workers and the simulated provider
test: install browser sandbox
	DATABASE_URL=$(TEST_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

## make lint: ruff (lint + format check), then mypy with django-stubs and drf-stubs
## ([tool.mypy] in pyproject.toml; it imports the settings, so it needs no database).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf .autopack test-artifacts

## make bench: the benchmark suite (bench/, issue 7) at full size; writes docs/benchmarks.md.
## Its own database and Redis db, so it never touches the dev or test ones.
BENCH_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/autopack_bench
BENCH_BROKER_URL   ?= redis://127.0.0.1:6379/13
BENCH_ARGS         ?=

bench: install
	BENCH_DATABASE_URL=$(BENCH_DATABASE_URL) BENCH_BROKER_URL=$(BENCH_BROKER_URL) \
		$(BIN)/python -m bench --size full $(BENCH_ARGS)

## make bench-smoke: the same suite at tiny sizes (a minute or two); checks it still works.
bench-smoke: install
	BENCH_DATABASE_URL=$(BENCH_DATABASE_URL) BENCH_BROKER_URL=$(BENCH_BROKER_URL) \
		$(BIN)/python -m bench --size smoke $(BENCH_ARGS)

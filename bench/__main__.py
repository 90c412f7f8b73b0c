"""`python -m bench [--size full|smoke]`: run the suite, print the table, write the page."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .core import ROOT, SIZES, Figure, env_for_children, log, processes

GROUPS = (
    "router",
    "record_usage",
    "bulk",
    "ingest",
    "apply_commit",
    "sandbox_start",
    "pages",
    "status",
    "orchestration",
    "many_runs",
    "summary_large",
    "windows",
)
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/autopack_bench"
DEFAULT_BROKER = "redis://127.0.0.1:6379/13"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument(
        "--only", default="", help=f"comma-separated groups to run, of: {', '.join(GROUPS)}"
    )
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB))
    parser.add_argument("--broker-url", default=os.environ.get("BENCH_BROKER_URL", DEFAULT_BROKER))
    parser.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="page to write (default: docs/benchmarks.md for the full size, none for smoke)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "test-artifacts" / "bench")
    parser.add_argument(
        "--rewrite-doc",
        action="store_true",
        help="only render the page again from the figures the last run of this size kept",
    )
    return parser.parse_args(argv)


def check_isolation(database_url: str, broker_url: str) -> None:
    """The suite truncates tables: refuse anything that looks like a real database."""
    name = urlsplit(database_url).path.lstrip("/")
    if "bench" not in name and not name.startswith("test_"):
        sys.exit(f"refusing database {name!r}: its name must contain 'bench' or start with test_")
    if not broker_url.startswith("redis://"):
        sys.exit("the benchmarks need a Redis broker (redis://…)")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    size = SIZES[args.size]
    only = {g.strip() for g in args.only.split(",") if g.strip()} or set(GROUPS)
    unknown = only - set(GROUPS)
    if unknown:
        sys.exit(f"unknown groups: {', '.join(sorted(unknown))}")
    check_isolation(args.database_url, args.broker_url)
    if args.rewrite_doc:
        # Django is needed for the machine section (PostgreSQL and Redis versions).
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
        os.environ["DATABASE_URL"] = args.database_url
        os.environ["CELERY_BROKER_URL"] = args.broker_url
        import django

        django.setup()
        report = json.loads((args.log_dir / f"figures-{size.name}.json").read_text())
        render_doc(args.doc or ROOT / "docs" / "benchmarks.md", report)
        return 0

    state_dir = args.log_dir / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    child_env = env_for_children(args.database_url, args.broker_url, state_dir)
    # This process uses the same settings as its children.
    for key in (
        "DATABASE_URL",
        "CELERY_BROKER_URL",
        "DJANGO_SETTINGS_MODULE",
        "AUTOPACK_STATE_DIR",
        "DJANGO_SECRET_KEY",
    ):
        os.environ[key] = child_env[key]

    from .core import ensure_database

    ensure_database(args.database_url)

    import django

    django.setup()
    from django.core.management import call_command

    from simulator import simulated_provider_env

    # The router treats a provider without a key as unconfigured: give each a (fake) key, as
    # the simulated set-up does. No call leaves this process from here.
    os.environ.update(
        {k: v for k, v in simulated_provider_env("http://127.0.0.1:9").items() if "KEY" in k}
    )
    call_command("migrate", interactive=False, verbosity=0)

    from . import data, edits, ingest, many_runs, micro, sandbox_start, web, windows, workers
    from .report import print_table

    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    t_start = time.perf_counter()
    figures: list[Figure] = []
    failures: list[str] = []

    def attempt(group: str, fn: Callable[[], Figure | list[Figure]]) -> None:
        if group not in only:
            return
        log(f"--- {group}")
        try:
            result = fn()
            figures.extend(result if isinstance(result, list) else [result])
        except Exception:
            failures.append(group)
            log(f"{group} FAILED:\n{traceback.format_exc()}")

    data.truncate_runs()
    data.truncate_usage()
    user, token = data.staff_token()
    attempt("router", lambda: micro.bench_select_model(size))
    attempt("record_usage", lambda: micro.bench_record_usage(size))
    attempt("bulk", lambda: micro.bench_bulk(size))
    attempt("apply_commit", lambda: edits.bench_apply_commit(size))
    attempt("sandbox_start", lambda: sandbox_start.bench_sandbox_start(size))

    page_runs = [data.page_run(n) for n in size.page_phases]
    if "ingest" in only:
        # Before the usage table is filled: the figure empties it before and after each pass.
        with processes(child_env, args.log_dir) as procs:
            attempt("ingest", lambda: ingest.ingest_figure(size, procs, child_env, page_runs[0]))
    small: dict[str, float] | None = None
    large: dict[str, float] | None = None
    # The cap windows are read over the usage summary's events, at its two sizes.
    win_small: dict[str, Any] | None = None
    needs_events = only & {"pages", "summary_large", "status", "windows"}
    fill_seconds: dict[int, float] = {}
    if needs_events:
        log(f"--- filling {size.events_small:,} usage events")
        fill_seconds[size.events_small] = data.fill_events(size.events_small, runs=page_runs)
    attempt("pages", lambda: web.pages_figure(user, page_runs, size.events_small))
    if needs_events:
        try:
            small = web.summary_point(size, token, size.events_small)
        except Exception:
            failures.append("summary_small")
            log(f"summary FAILED:\n{traceback.format_exc()}")
    if "windows" in only:
        try:
            win_small = windows.window_point(size, size.events_small)
        except Exception:
            failures.append("windows_small")
            log(f"windows FAILED:\n{traceback.format_exc()}")

    with processes(child_env, args.log_dir) as procs:
        attempt("status", lambda: web.status_figure(size, procs, child_env, token, page_runs[-1]))
        attempt("orchestration", lambda: workers.orchestration_figures(size, procs, child_env))
    with processes(child_env, args.log_dir) as procs:
        attempt("many_runs", lambda: many_runs.many_runs_figure(size, procs, child_env))

    large_summary = "summary_large" in only and small is not None
    large_windows = "windows" in only and win_small is not None
    if large_summary or large_windows:
        log(f"--- filling {size.events_large:,} usage events")
        fill_seconds[size.events_large] = data.fill_events(size.events_large, runs=page_runs)
    if large_summary:
        assert small is not None

        def summary_large() -> Figure:
            nonlocal large
            large = web.summary_point(size, token, size.events_large)
            return web.summary_figure(small, large)

        attempt("summary_large", summary_large)
    elif small is not None:
        figures.append(web.summary_figure(small, None))
    if large_windows:
        assert win_small is not None
        attempt(
            "windows",
            lambda: windows.window_figure(win_small, windows.window_point(size, size.events_large)),
        )
    elif win_small is not None:
        figures.append(windows.window_figure(win_small, None))
    for events, seconds in fill_seconds.items():
        log(f"filling to {events:,} events took {seconds:.0f} s")

    duration = time.perf_counter() - t_start
    print()
    print_table(figures)
    print(
        f"\nsize {size.name}, {duration / 60:.1f} min"
        + (f"; FAILED: {failures}" if failures else "")
    )

    report = {
        "size": size.name,
        "started": started,
        "duration_s": duration,
        "fill_seconds": {str(k): v for k, v in fill_seconds.items()},
        "failures": failures,
        "figures": [f.as_dict() for f in figures],
    }
    # Kept beside the logs so the page can be rendered again without measuring again
    # (`--rewrite-doc`), e.g. after its prose changed.
    args.log_dir.mkdir(parents=True, exist_ok=True)
    (args.log_dir / f"figures-{size.name}.json").write_text(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    doc = (
        args.doc
        if args.doc is not None
        else (ROOT / "docs" / "benchmarks.md" if size.name == "full" else None)
    )
    if doc is not None:
        render_doc(doc, report)
    return 1 if failures else 0


def render_doc(doc: Path, report: dict[str, Any]) -> None:
    from .notes import sections
    from .report import write_doc

    figures = [Figure(**f) for f in report["figures"]]
    extra = [
        f"Filling the usage table to {int(e):,} events took {s:.0f} s (included above)."
        for e, s in report["fill_seconds"].items()
    ]
    write_doc(
        doc,
        figures,
        size=report["size"],
        started=report["started"],
        duration_s=report["duration_s"],
        sections=[*sections(figures), *extra],
    )
    log(f"wrote {doc}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

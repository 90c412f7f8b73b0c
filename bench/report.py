"""The printed table and docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from .core import Figure

REPRODUCE = """\
```sh
make bench          # full size (this page); needs PostgreSQL on 127.0.0.1:5432 and Redis
make bench-smoke    # tiny sizes, a minute or two: checks every figure is still produced
```

Both use their own database and Redis db: `BENCH_DATABASE_URL`
(default `postgres://postgres@127.0.0.1:5432/autopack_bench`, created if missing) and
`BENCH_BROKER_URL` (default `redis://127.0.0.1:6379/13`); the suite truncates the run and usage
tables of that database, and refuses a database whose name has neither `bench` nor `test_` in
it. `.venv/bin/python -m bench --help` lists the options (`--only` runs some figures). Logs of
the processes it starts (simulated provider, Celery workers, gunicorn) go to
`test-artifacts/bench/`. CI runs the smoke size inside `make test`
(`tests/bench/test_bench_smoke.py`), which checks that every figure is produced, not that it
meets its target: benchmarks are not timed tests."""


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip()


def verdict(figure: Figure) -> str:
    return {True: "met", False: "MISSED", None: "—"}[figure.met]


def table_rows(figures: list[Figure]) -> list[tuple[str, str, str, str, str]]:
    return [
        (
            f.label,
            fmt(f.value, f.unit),
            f"{fmt(f.floor, f.unit if f.floor is not None else '')} ({f.floor_label})"
            if f.floor is not None
            else "—",
            f.target,
            verdict(f),
        )
        for f in figures
    ]


def print_table(figures: list[Figure]) -> None:
    rows = [("figure", "measured", "floor (same run)", "target", "")]
    rows += table_rows(figures)
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(5)]
    for n, row in enumerate(rows):
        print("  ".join(cell[: widths[i]].ljust(widths[i]) for i, cell in enumerate(row)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for f in figures:
        print(f"* {f.label}")
        for note in f.notes:
            print(f"    {note}")


def machine() -> dict[str, str]:
    from django.db import connection

    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg = cursor.fetchone()[0]
        cursor.execute("SHOW shared_buffers")
        buffers = cursor.fetchone()[0]
        cursor.execute("SHOW synchronous_commit")
        sync = cursor.fetchone()[0]
    import django
    import redis
    from django.conf import settings

    info: dict[str, Any] = redis.Redis.from_url(settings.CELERY_BROKER_URL).info("server")
    return {
        "CPU": f"{os.cpu_count()} cores (nproc), {cpu}",
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "PostgreSQL": f"{pg} (shared_buffers {buffers}, synchronous_commit {sync}), loopback",
        "Redis": f"{info.get('redis_version')}, loopback",
        "Python / Django": f"{sys.version.split()[0]} / {django.get_version()}",
    }


def write_doc(
    path: Path,
    figures: list[Figure],
    *,
    size: str,
    started: str,
    duration_s: float,
    sections: list[str],
) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Autopack sits on the path of every LLM call and every dashboard poll, so its own cost "
        "must be small next to a provider call and must not grow with history (issue 7). "
        "Each figure below was measured on this machine against real PostgreSQL, Redis, "
        "gunicorn, Celery workers and the simulated provider over HTTP, next to a floor "
        "measured in the same run. This page is written by `make bench`; do not edit the "
        "figures by hand.",
        "",
        f"- Date: {started} UTC, size `{size}`, the whole suite took {duration_s / 60:.1f} min",
    ]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += [
        "- The machine is shared: other test suites may run at the same time, so figures "
        "move by some percent from run to run; floors are measured alongside for that reason.",
        "",
        "## Figures",
        "",
        "| figure | measured | floor (same run) | target | |",
        "|---|---|---|---|---|",
    ]
    lines += [
        "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_rows(figures)
    ]
    lines += ["", "## Details", ""]
    for f in figures:
        lines.append(f"**{f.label}** — {verdict(f)}")
        lines.append("")
        lines += [f"- {note}" for note in f.notes]
        lines.append("")
    for section in sections:
        lines += [section, ""]
    lines += ["## How to reproduce", "", REPRODUCE, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))

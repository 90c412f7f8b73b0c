"""The sandbox's start per check (issue 13): `runs.sandbox.run_check` of a command beside the
same command run directly, with its output captured the same way."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runs.sandbox import _environment, run_check, sandbox_status

from .core import Figure, Size, log, median, percentile

# A command that does nothing, so the figure is the sandbox's own cost; and a real Python start,
# as `python -m pytest` pays it, for the note.
EMPTY = "true"
PYTHON = "python -c pass"


def _direct(command: str, workspace: Path) -> float:
    # The check's own environment, so `python` is the same interpreter on both sides.
    env = _environment(
        home=str(workspace), tmp=str(workspace), bin_dirs=[str(Path(sys.prefix) / "bin")]
    )
    start = time.perf_counter()
    subprocess.run(
        ["/bin/sh", "-c", command],
        cwd=workspace,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=True,
    )
    return time.perf_counter() - start


def _sandboxed(command: str, workspace: Path) -> float:
    start = time.perf_counter()
    result = run_check(command=command, workspace=workspace, timeout=60)
    elapsed = time.perf_counter() - start
    if not result.passed:
        raise RuntimeError(f"{command!r} failed in the sandbox: {result.reason} {result.output}")
    return elapsed


def bench_sandbox_start(size: Size) -> Figure:
    status = sandbox_status()
    if not status.available:
        raise RuntimeError(f"no sandbox to measure: {status.reason}")
    rounds = 200 if size.name == "full" else 10
    with tempfile.TemporaryDirectory(prefix="autopack-bench-") as tmp:
        workspace = Path(tmp)
        times: dict[tuple[str, str], list[float]] = {}
        _sandboxed(EMPTY, workspace)  # the probe and cgroup discovery, once per process
        # Interleaved, so a busy moment on the shared machine falls on both sides alike.
        for _ in range(rounds):
            for command in (EMPTY, PYTHON):
                times.setdefault(("direct", command), []).append(_direct(command, workspace))
                times.setdefault(("sandbox", command), []).append(_sandboxed(command, workspace))
    ms = {k: [v * 1e3 for v in vs] for k, vs in times.items()}
    value, floor = median(ms[("sandbox", EMPTY)]), median(ms[("direct", EMPTY)])
    over = value - floor
    py_over = median(ms[("sandbox", PYTHON)]) - median(ms[("direct", PYTHON)])
    log(f"sandbox start: {value:.1f} ms per check, direct {floor:.1f} ms (+{over:.1f} ms)")
    return Figure(
        key="sandbox_start",
        label=f"a check's start in the sandbox (`{EMPTY}` through run_check, median)",
        value=value,
        unit="ms",
        floor=floor,
        floor_label=f"`sh -c {EMPTY}` run directly, output captured",
        target="≤ 50 ms over the same command run directly",
        met=over <= 50,
        notes=[
            f"+{over:.1f} ms median, +{percentile(ms[('sandbox', EMPTY)], 95) - floor:.1f} ms "
            f"at p95 over {rounds} checks: bubblewrap's namespaces and mounts, the check's "
            "cgroup made and removed, the wrapper that joins it and prlimit",
            f"`{PYTHON}`: {median(ms[('sandbox', PYTHON)]):.1f} ms in the sandbox, "
            f"{median(ms[('direct', PYTHON)]):.1f} ms directly (+{py_over:.1f} ms)",
            f"limits here: {status.limits}",
        ],
    )

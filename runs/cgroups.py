"""Memory and process limits for one check, from a cgroup of its own (runs.sandbox).

Why cgroups and not only RLIMITs: the workers usually run as root, and the kernel never applies
RLIMIT_NPROC to uid 0 (nor does bubblewrap's user namespace change that: the sandbox's uid 0 is
still the host's). Measured on the development machine (Debian 12, kernel 6.18, root): inside
`bwrap --unshare-all` with `prlimit --nproc=50`, a loop started 200 sleeping children without a
single failure; the same loop in a cgroup with `pids.max = 50` stopped at 50 ("Cannot fork").
So the process limit comes from a cgroup's `pids.max` and the memory limit from `memory.max`
(v2) or `memory.limit_in_bytes` (v1); RLIMITs are kept as a second line (they do bind a worker
that is not root).

Where this process may create cgroups is found once per process: first its own cgroup v2
directory (a delegated one, e.g. systemd's `Delegate=yes`, where the pids and memory controllers
are enabled for children), then the v1 hierarchies (`pids`, `memory`) of a hybrid set-up, such as
this machine's, where the v2 tree has no controllers. Either may be missing: a controller found
nowhere is simply not applied, and `cgroup_support()` says so.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import time
from dataclasses import dataclass
from itertools import count
from pathlib import Path

PREFIX = "autopack-check-"
CONTROLLERS = ("pids", "memory")
# The file that sets each controller's limit, per cgroup version.
_LIMIT_FILE = {
    (2, "pids"): "pids.max",
    (2, "memory"): "memory.max",
    (1, "pids"): "pids.max",
    (1, "memory"): "memory.limit_in_bytes",
}
_serial = count(1)


@dataclass(frozen=True)
class Place:
    """A cgroup directory under which this process can create a check's cgroup."""

    version: int
    parent: Path
    controllers: tuple[str, ...]


@dataclass(frozen=True)
class CgroupSupport:
    places: tuple[Place, ...]

    @property
    def controllers(self) -> set[str]:
        return {c for p in self.places for c in p.controllers}

    def describe(self) -> str:
        if not self.places:
            return "no writable cgroup: memory and process limits are RLIMITs only"
        parts = [f"cgroup v{p.version} ({', '.join(p.controllers)})" for p in self.places]
        missing = [c for c in CONTROLLERS if c not in self.controllers]
        text = " and ".join(parts)
        if missing:
            text += f"; no {' or '.join(missing)} controller: RLIMITs only for that"
        return text


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(root, mount point, fs type, super options) of every cgroup mount."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and tail and tail[0] in ("cgroup", "cgroup2"):
            found.append(
                (fields[3], fields[4], tail[0], set(tail[2].split(",")) if len(tail) > 2 else set())
            )
    return found


def _under(mount_root: str, mount_point: str, path: str) -> Path:
    # In a cgroup namespace or a bind-mounted cgroupfs the mount's root may be a subtree.
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        path = path[len(mount_root) :]
    return Path(mount_point) / path.lstrip("/")


def _probe(version: int, parent: Path, wanted: tuple[str, ...]) -> Place | None:
    probe = parent / f"autopack-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        have = tuple(c for c in wanted if (probe / _LIMIT_FILE[(version, c)]).exists())
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return Place(version, parent, have) if have else None


@functools.lru_cache(maxsize=1)
def cgroup_support() -> CgroupSupport:
    """Where this process can place checks, found once (the answer does not change)."""
    try:
        own = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
        mounts = _mounts()
    except OSError:
        return CgroupSupport(())
    places: list[Place] = []
    for hid, names, path in own:
        if hid == "0" and not names:
            for root, point, fstype, _ in mounts:
                if fstype == "cgroup2":
                    place = _probe(2, _under(root, point, path), CONTROLLERS)
                    if place:
                        places.append(place)
                    break
    covered = {c for p in places for c in p.controllers}
    for _hid, names, path in own:
        for controller in CONTROLLERS:
            if controller in covered or controller not in names.split(","):
                continue
            for root, point, fstype, options in mounts:
                if fstype == "cgroup" and controller in options:
                    place = _probe(1, _under(root, point, path), (controller,))
                    if place:
                        places.append(place)
                        covered.add(controller)
                    break
    return CgroupSupport(tuple(places))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids(directory: Path) -> list[int]:
    try:
        return [int(x) for x in (directory / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _kill_all(directory: Path) -> None:
    kill_file = directory / "cgroup.kill"  # v2, kernel ≥ 5.14: atomic, no race with fork
    if kill_file.exists():
        with contextlib.suppress(OSError):
            kill_file.write_text("1")
            return
    # v1: a process may fork between the read and the kill; the process limit bounds the
    # rounds that takes.
    for _ in range(1000):
        pids = _pids(directory)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _remove(directory: Path, *, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            directory.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
        _kill_all(directory)
        time.sleep(0.01)


def _sweep_stale(parent: Path) -> None:
    """Remove check cgroups left by a worker that died during a check (SIGKILL)."""
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(PREFIX)]
    except OSError:
        return
    for entry in entries:
        owner = entry.name[len(PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not _pid_alive(int(owner)):
            _kill_all(entry)
            _remove(entry, wait=1.0)


class CheckCgroup:
    """The cgroup(s) of one check: limits set, then the check joins through `procs_files`."""

    def __init__(self, directories: list[tuple[Place, Path]]) -> None:
        self.directories = directories

    @classmethod
    def create(cls, *, memory_bytes: int, max_pids: int) -> CheckCgroup | None:
        support = cgroup_support()
        if not support.places:
            return None
        name = f"{PREFIX}{os.getpid()}-{next(_serial)}"
        limits = {"pids": str(max_pids), "memory": str(memory_bytes)}
        made: list[tuple[Place, Path]] = []
        try:
            for place in support.places:
                _sweep_stale(place.parent)
                directory = place.parent / name
                directory.mkdir()
                made.append((place, directory))
                for controller in place.controllers:
                    (directory / _LIMIT_FILE[(place.version, controller)]).write_text(
                        limits[controller]
                    )
                if place.version == 2 and "memory" in place.controllers:
                    # Without this, a check over its memory would swap instead of being killed.
                    with contextlib.suppress(OSError):
                        (directory / "memory.swap.max").write_text("0")
        except OSError:
            cls(made).remove()
            return None
        return cls(made)

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for _, d in self.directories]

    def kill(self) -> None:
        for _, directory in self.directories:
            _kill_all(directory)

    def empty(self) -> bool:
        return not any(_pids(d) for _, d in self.directories)

    def limits_hit(self) -> list[str]:
        """Which limits the check ran into: "pids", "memory"."""
        hit = []
        for place, directory in self.directories:
            if "pids" in place.controllers and _event(directory / "pids.events", "max"):
                hit.append("pids")
            if "memory" in place.controllers:
                events = "memory.events" if place.version == 2 else "memory.oom_control"
                if _event(directory / events, "oom_kill"):
                    hit.append("memory")
        return hit

    def remove(self) -> None:
        for _, directory in self.directories:
            _remove(directory, wait=2.0)


def _event(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0

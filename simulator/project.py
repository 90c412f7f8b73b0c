"""The small real Python project the simulated builder grows, one phase at a time.

For the builder prompt of phase P ("Phase P: <name>") the reply is a set of edit blocks in
Autopack's edit format (docs/edits.md; written out here, not imported: the simulator stands
in for a provider and must not depend on the code it is testing) that:

- WRITEs `app/p<PP>_<slug>.py`, a module with one small pure function, and
  `tests/test_p<PP>_<slug>.py`, its test;
- registers the module in `app/__init__.py` with a SEARCH/REPLACE on a fixed anchor line, or,
  when the prompt's "Repository files:" list has no `app/__init__.py`, WRITEs that file (with
  the anchor), `tests/test_registry.py` and `pytest.ini`.

So the repository's `python -m pytest -q` passes after every approved phase. Everything is a
pure function of (seed, prompt): the same request gets the same reply.

Faults, each at its own rate, only on a first try (attempt 1 and no "Your previous attempt
was refused:" section), so the revise that follows is always clean:

- `edit_miss`: the SEARCH on `app/__init__.py` carries the anchor with the wrong indentation,
  so its search text is not found (or, before the file exists, names a missing file);
- `edit_malformed`: the module's WRITE block is closed with the SEARCH block's closing marker;
- `check_fail`: the change applies but its test asserts a wrong value, so the checks fail.
"""

from __future__ import annotations

import random
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The edit format's markers (docs/edits.md).
OPEN = "<<<<<<<"
DIVIDER = "======="
END_WRITE = ">>>>>>> END"
END_REPLACE = ">>>>>>> REPLACE"

REGISTRY = "app/__init__.py"
REGISTRY_TEST = "tests/test_registry.py"
PYTEST_INI = "pytest.ini"
ANCHOR = "    # new modules above this line (Autopack's simulated builder)"
# The anchor as a model misremembers it: two spaces instead of four.
WRONG_ANCHOR = ANCHOR[2:]

EDIT_FAULTS = ("edit_miss", "edit_malformed", "check_fail")
REFUSED = "Your previous attempt was refused:"

_PHASE = re.compile(r"^Phase (\d+):\s*(.+)$", re.M)
_ATTEMPT = re.compile(r"^Attempt:\s*(\d+)\s*$", re.M)
_REVISION = re.compile(r"^The auditor asked for a revision", re.M)
_FEEDBACK = re.compile(r"^- \[(?:minor|major|critical|\?)\]\s*([^:\n]+)", re.M)
_UNSAFE = re.compile(r"[^A-Za-z0-9 .,:;_()/+#-]")


@dataclass(frozen=True)
class FaultRates:
    """Shares of first tries that carry each fault (their sum is at most 1)."""

    edit_miss: float = 0.0
    edit_malformed: float = 0.0
    check_fail: float = 0.0


NO_FAULTS = FaultRates()


def _safe(text: str, limit: int = 80) -> str:
    return _UNSAFE.sub("", text).strip()[:limit] or "unnamed"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40].strip("_") or "change"


# --- the functions a phase can add ----------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """One small pure function: its source, a reference to compute the tests' expected
    values, example arguments drawn from an rng, and an edge-case test for the revise."""

    name: str
    source: str
    reference: Callable[..., Any]
    examples: Callable[[random.Random], tuple[Any, ...]]
    edge: str  # lines of the edge-case test body
    imports: str = ""
    edge_needs_pytest: bool = False


_WORDS = ["team", "invite", "token", "admin", "member", "Level", "noon", "Racecar", "expiry"]


def _words(rng: random.Random, low: int = 1, high: int = 4) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))


def _ints(rng: random.Random, low: int = 0, high: int = 6) -> list[int]:
    return [rng.randint(-9, 30) for _ in range(rng.randint(low, high))]


def _checksum(text: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate(text)) % 65521


def _palindrome(text: str) -> bool:
    letters = [ch.lower() for ch in text if ch.isalnum()]
    return letters == letters[::-1]


def _running(values: list[int]) -> list[int]:
    out, total = [], 0
    for value in values:
        total += value
        out.append(total)
    return out


def _within(timestamps: list[int], now: int, limit: int, window: int) -> bool:
    return sum(1 for t in timestamps if now - window < t <= now) < limit


TEMPLATES: tuple[Template, ...] = (
    Template(
        name="clamp",
        source='''def clamp(value: int, low: int, high: int) -> int:
    """The value moved into [low, high]."""
    if low > high:
        raise ValueError("low must not exceed high")
    return max(low, min(high, value))
''',
        reference=lambda value, low, high: max(low, min(high, value)),
        examples=lambda rng: (rng.randint(-50, 50), rng.randint(-10, 0), rng.randint(1, 20)),
        edge="    with pytest.raises(ValueError):\n        clamp(1, 5, 0)\n",
        edge_needs_pytest=True,
    ),
    Template(
        name="slugify",
        imports="import re\n",
        source='''def slugify(text: str) -> str:
    """Lower-case words joined by '-', everything else dropped."""
    return "-".join(re.findall(r"[a-z0-9]+", text.lower()))
''',
        reference=lambda text: "-".join(re.findall(r"[a-z0-9]+", text.lower())),
        examples=lambda rng: (_words(rng).replace(" ", rng.choice([" ", "  ", "_", "! "])),),
        edge='    assert slugify("") == ""\n    assert slugify("--!--") == ""\n',
    ),
    Template(
        name="word_count",
        source='''def word_count(text: str) -> int:
    """How many words, separated by any whitespace, the text has."""
    return len(text.split())
''',
        reference=lambda text: len(text.split()),
        examples=lambda rng: (_words(rng, 0, 6),),
        edge='    assert word_count("") == 0\n    assert word_count(" \\t\\n ") == 0\n',
    ),
    Template(
        name="checksum",
        source='''def checksum(text: str) -> int:
    """A position-weighted sum of the characters, modulo 65521."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(text)) % 65521
''',
        reference=_checksum,
        examples=lambda rng: (_words(rng),),
        edge='    assert checksum("") == 0\n    assert checksum("ab") != checksum("ba")\n',
    ),
    Template(
        name="chunked",
        source='''def chunked(items: list[int], size: int) -> list[list[int]]:
    """The items in consecutive lists of `size` (the last may be shorter)."""
    if size < 1:
        raise ValueError("size must be at least 1")
    return [items[i : i + size] for i in range(0, len(items), size)]
''',
        reference=lambda items, size: [items[i : i + size] for i in range(0, len(items), size)],
        examples=lambda rng: (_ints(rng), rng.randint(1, 4)),
        edge="    with pytest.raises(ValueError):\n        chunked([1, 2], 0)\n",
        edge_needs_pytest=True,
    ),
    Template(
        name="is_palindrome",
        source='''def is_palindrome(text: str) -> bool:
    """Whether the letters and digits read the same both ways, ignoring case."""
    letters = [ch.lower() for ch in text if ch.isalnum()]
    return letters == letters[::-1]
''',
        reference=_palindrome,
        examples=lambda rng: (rng.choice([*_WORDS, "never odd or even", "top spot"]),),
        edge='    assert is_palindrome("")\n    assert not is_palindrome("ab")\n',
    ),
    Template(
        name="running_total",
        source='''def running_total(values: list[int]) -> list[int]:
    """The sum of the values so far, after each value."""
    out, total = [], 0
    for value in values:
        total += value
        out.append(total)
    return out
''',
        reference=_running,
        examples=lambda rng: (_ints(rng, 1),),
        edge="    assert running_total([]) == []\n",
    ),
    Template(
        name="within_limit",
        source='''def within_limit(
    timestamps: list[int], now: int, limit: int, window: int
) -> bool:
    """Whether one more event at `now` stays under `limit` events per `window` seconds."""
    return sum(1 for t in timestamps if now - window < t <= now) < limit
''',
        reference=_within,
        examples=lambda rng: (
            sorted(rng.randint(0, 100) for _ in range(rng.randint(0, 6))),
            rng.randint(60, 120),
            rng.randint(1, 5),
            rng.choice([30, 60]),
        ),
        edge="    assert within_limit([], 0, 1, 60)\n    assert not within_limit([5], 5, 1, 60)\n",
    ),
    Template(
        name="median",
        imports="import statistics\n",
        source='''def median(values: list[int]) -> float:
    """The middle value (the mean of the two middle ones for an even count)."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))
''',
        reference=lambda values: float(statistics.median(values)),
        examples=lambda rng: (_ints(rng, 1),),
        edge="    with pytest.raises(ValueError):\n        median([])\n",
        edge_needs_pytest=True,
    ),
)


def _wrong(value: Any) -> Any:
    """A value the function does not return, for the check_fail fault."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "!"
    return [*value, 0]


# --- reading the builder prompt -------------------------------------------------------------


@dataclass(frozen=True)
class BuilderRequest:
    position: int
    name: str
    attempt: int
    files: tuple[str, ...]  # the prompt's "Repository files:" list
    refused: bool  # the previous attempt was refused (edit error or failing check)
    feedback: tuple[str, ...]  # the auditor's issue titles, when it asked for a revision

    @property
    def revising(self) -> bool:
        return self.attempt > 1 or self.refused or bool(self.feedback)


def _repository_files(text: str) -> tuple[str, ...]:
    lines = text.split("\n")
    try:
        start = lines.index("Repository files:")
    except ValueError:
        return ()
    files = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        if line.startswith("- "):
            files.append(line[2:].strip())
    return tuple(files)


def read_builder_prompt(text: str) -> BuilderRequest:
    phase = _PHASE.search(text)
    attempt = _ATTEMPT.search(text)
    revision = _REVISION.search(text)
    feedback = _FEEDBACK.findall(text[revision.start() :]) if revision else []
    return BuilderRequest(
        position=int(phase.group(1)) if phase else 1,
        name=phase.group(2).strip() if phase else "the requested change",
        attempt=int(attempt.group(1)) if attempt else 1,
        files=_repository_files(text),
        refused=re.search(rf"^{re.escape(REFUSED)}", text, re.M) is not None,
        feedback=tuple(_safe(t) for t in feedback[:10]),
    )


def pick_fault(request: BuilderRequest, *, roll: float, rates: FaultRates) -> str | None:
    """The fault this request carries: none on a revise, else by `roll` in [0, 1)."""
    if request.revising:
        return None
    edge = 0.0
    for fault in EDIT_FAULTS:
        edge += getattr(rates, fault)
        if roll < edge:
            return fault
    return None


# --- writing the reply ----------------------------------------------------------------------


def _write(path: str, content: str, *, close: str = END_WRITE) -> str:
    return f"{OPEN} WRITE {path}\n{content}{close}\n"


def _replace(path: str, search: str, replace: str) -> str:
    return f"{OPEN} SEARCH {path}\n{search}{DIVIDER}\n{replace}{END_REPLACE}\n"


def _registry(module: str) -> str:
    return (
        '"""The demo project grown by Autopack\'s simulated builder: one module per phase."""\n'
        "\n"
        "MODULES = [\n"
        f'    "{module}",\n'
        f"{ANCHOR}\n"
        "]\n"
    )


_REGISTRY_TEST = """import importlib

from app import MODULES


def test_every_registered_module_imports_and_says_what_it_is() -> None:
    assert MODULES
    for name in MODULES:
        assert importlib.import_module(name).__doc__
"""

# `pythonpath = .` lets `pytest` find the app package without `python -m`; the file also marks
# the project's root, so pytest reads no configuration from folders above the repository.
_PYTEST_INI = "[pytest]\ntestpaths = tests\npythonpath = .\naddopts = -p no:cacheprovider\n"


def _call(name: str, args: tuple[Any, ...]) -> str:
    return f"{name}({', '.join(repr(a) for a in args)})"


@dataclass(frozen=True)
class BuiltPhase:
    text: str  # the whole reply: commentary, then the edit blocks
    fault: str | None
    module: str  # the module's path
    test: str  # its test's path


def _lines(text: str) -> str:
    n = text.count("\n")
    return f"{n} line{'s' if n != 1 else ''}"


def build_phase(request: BuilderRequest, *, seed: int, fault: str | None) -> BuiltPhase:
    """The reply for one builder request. The project's content depends on (seed, phase) and
    whether this is a revise, never on the model: a retry of the phase on another model
    changes the same files the same way."""
    title = _safe(request.name)
    stem = f"p{request.position:02d}_{_slug(title)}"
    module_path, test_path = f"app/{stem}.py", f"tests/test_{stem}.py"
    dotted = f"app.{stem}"
    offset = random.Random(f"{seed}:templates").randrange(len(TEMPLATES))
    template = TEMPLATES[(request.position - 1 + offset) % len(TEMPLATES)]
    rng = random.Random(f"{seed}:project:{request.position}:{stem}")
    cases = [template.examples(rng) for _ in range(3)]

    module = (
        f'"""{title}: phase {request.position} of the demo project.\n\n'
        f"Written by Autopack's simulated builder: {template.name}(), a small pure function.\n"
        '"""\n\n'
        "from __future__ import annotations\n\n"
        + (f"{template.imports}\n" if template.imports else "")
        + f"\n{template.source}"
    )
    asserts = []
    for i, args in enumerate(cases):
        expected = template.reference(*args)
        if fault == "check_fail" and i == 0:
            expected = _wrong(expected)
        asserts.append(f"    assert {_call(template.name, args)} == {expected!r}\n")
    edge = request.revising
    test = (
        f'"""Tests for {dotted} (phase {request.position})."""\n\n'
        + ("import pytest\n\n" if edge and template.edge_needs_pytest else "")
        + f"from {dotted} import {template.name}\n\n\n"
        + f"def test_{template.name}_gives_the_expected_values() -> None:\n"
        + "".join(asserts)
    )
    if edge:
        test += f"\n\ndef test_{template.name}_handles_the_edge_cases() -> None:\n{template.edge}"

    new_module = module_path not in request.files
    blocks = [
        _write(module_path, module, close=END_REPLACE if fault == "edit_malformed" else END_WRITE),
        _write(test_path, test),
    ]
    touched = [
        f"- {module_path}: {'added' if new_module else 'rewritten'} ({_lines(module)})",
        f"- {test_path}: {'added' if new_module else 'rewritten'} ({_lines(test)})",
    ]
    if fault == "edit_miss":
        anchor = f"{WRONG_ANCHOR}\n"
        blocks.append(_replace(REGISTRY, anchor, f'    "{dotted}",\n{anchor}'))
        touched.append(f"- {REGISTRY}: registers the module (1 line)")
    elif REGISTRY not in request.files:
        blocks.append(_write(REGISTRY, _registry(dotted)))
        touched.append(f"- {REGISTRY}: added, the module registry ({_lines(_registry(dotted))})")
    elif new_module:
        anchor = f"{ANCHOR}\n"
        blocks.append(_replace(REGISTRY, anchor, f'    "{dotted}",\n{anchor}'))
        touched.append(f"- {REGISTRY}: registers the module (1 line)")
    for path, content in ((REGISTRY_TEST, _REGISTRY_TEST), (PYTEST_INI, _PYTEST_INI)):
        if path not in request.files:
            blocks.append(_write(path, content))
            touched.append(f"- {path}: added ({_lines(content)})")

    lines = [
        f"Implemented phase {request.position} ({title}), attempt {request.attempt}: "
        f"{template.name}() in {module_path}, with its test.",
        "",
        "Files touched:",
        *touched,
        "",
        "Summary:",
        f"{template.name}() is a small pure function; the module is listed in {REGISTRY}, "
        "whose own test imports every listed module.",
    ]
    if request.refused:
        lines += ["", "The previous attempt was refused; this one corrects it."]
    if request.feedback:
        lines += ["", "Auditor feedback addressed:"]
        lines += [f"- {issue}: fixed and covered by a test." for issue in request.feedback]
    lines += [
        "",
        "Tests:",
        f"{test_path} checks three examples"
        + (" and the edge cases." if edge else ".")
        + " Run python -m pytest -q.",
    ]
    return BuiltPhase(
        text="\n".join(lines) + "\n\n" + "".join(blocks),
        fault=fault,
        module=module_path,
        test=test_path,
    )

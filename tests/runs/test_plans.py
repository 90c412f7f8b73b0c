from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from runs.models import Phase, Run, Tier
from runs.plans import PlanError, parse_plan_bytes

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"


def plan_dict(**changes: object) -> dict[str, Any]:
    plan: dict[str, Any] = {
        "name": "Demo",
        "tiers": [
            {
                "name": "T1",
                "phases": [{"name": "P1", "category": "core_backend", "complexity": "low"}],
            },
            {
                "name": "T2",
                "phases": [
                    {
                        "name": "P2",
                        "category": "docs",
                        "complexity": "high",
                        "description": "d",
                        "acceptance_criteria": ["a", "b"],
                    }
                ],
            },
        ],
    }
    plan.update(changes)
    return plan


def test_the_example_plan_has_three_tiers_and_nine_phases() -> None:
    plan = parse_plan_bytes(EXAMPLE.read_bytes(), filename="plan.yaml")
    assert [len(t.phases) for t in plan.tiers] == [3, 4, 2]
    assert plan.max_attempts == 3
    assert {p.category for t in plan.tiers for p in t.phases} >= {
        "core_backend",
        "ui",
        "security_auth_change",
        "docs",
        "tests",
    }


def test_a_json_plan_is_read_like_a_yaml_one() -> None:
    plan = parse_plan_bytes(json.dumps(plan_dict()).encode(), filename="p.json")
    assert plan.tiers[1].phases[0].acceptance_criteria == ["a", "b"]


BILLION_LAUGHS = b"""
name: bomb
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
tiers: [*f]
"""


def _phase_p() -> dict:
    return {"name": "P", "category": "ui", "complexity": "low"}


def _bad(data: object) -> bytes:
    return json.dumps(data).encode()


def _phases(n: int) -> dict:
    return plan_dict(
        tiers=[
            {
                "name": "big",
                "phases": [
                    {"name": f"p{i}", "category": "core_backend", "complexity": "low"}
                    for i in range(n)
                ],
            }
        ]
    )


BAD_PLANS = {
    "unknown complexity": (
        _bad(
            plan_dict(
                tiers=[
                    {"name": "T", "phases": [{"name": "P", "category": "ui", "complexity": "huge"}]}
                ]
            )
        ),
        "tiers[0].phases[0].complexity: unknown complexity 'huge'",
    ),
    "empty tier": (
        _bad(plan_dict(tiers=[{"name": "Empty", "phases": []}])),
        "tiers[0] ('Empty').phases: a tier needs at least one phase",
    ),
    "missing plan name": (
        _bad({k: v for k, v in plan_dict().items() if k != "name"}),
        "name: required",
    ),
    "missing phase name": (
        _bad(plan_dict(tiers=[{"name": "T", "phases": [{"category": "ui", "complexity": "low"}]}])),
        "tiers[0].phases[0].name: required",
    ),
    "category of the wrong type": (
        _bad(
            plan_dict(
                tiers=[{"name": "T", "phases": [{"name": "P", "category": 7, "complexity": "low"}]}]
            )
        ),
        "tiers[0].phases[0].category: a lower-case identifier",
    ),
    "10 MB file": (b"name: x\n" + b"#" * 10_000_000, "the limit is 1,000,000 bytes"),
    "YAML bomb": (BILLION_LAUGHS, "anchors and aliases are not allowed"),
    "malformed YAML": (b"name: [unclosed\ntiers: x", "not valid YAML"),
    "malformed JSON": (b'{"name": "x", "tiers": [', "not valid JSON"),
    "script tag in a name": (
        _bad(plan_dict(name="<script>alert(1)</script>")),
        "name: must be plain text",
    ),
    "10,000 phases": (_bad(_phases(10_000)), "tiers: more than 2,000 phases"),
    "too many phases under the size limit": (
        json.dumps(_phases(2_001), separators=(",", ":")).encode(),
        "tiers: more than 2,000 phases",
    ),
    "workspace outside the workspace root": (
        _bad(plan_dict(workspace="../../etc")),
        "workspace: must be a relative path",
    ),
    "unknown field": (_bad(plan_dict(tier=[])), "plan: unknown field 'tier'"),
    "max_attempts out of range": (_bad(plan_dict(max_attempts=0)), "max_attempts:"),
    "bad guard": (
        _bad(
            plan_dict(
                guards=[
                    {
                        "provider": "anthropic",
                        "period": "year",
                        "threshold_percent": 80,
                        "action": "stop",
                    }
                ]
            )
        ),
        "guards[0].period: one of day, week, month",
    ),
}


def _one_phase(**phase: object) -> dict:
    phase = {"name": "P", "category": "ui", "complexity": "low", **phase}
    return plan_dict(tiers=[{"name": "T", "phases": [phase]}])


def _guard(provider: str) -> list[dict]:
    return [{"provider": provider, "period": "week", "threshold_percent": 80, "action": "stop"}]


# A YAML plan whose phase description is the given double-quoted YAML scalar (escapes and all).
YAML_DESCRIPTION = (
    "name: x\ntiers:\n  - name: T\n    phases:\n"
    "      - {{name: P, category: ui, complexity: low, description: {}}}\n"
)

# Text PostgreSQL cannot store (text and jsonb refuse NUL; a lone surrogate is not UTF-8) and
# names that read differently from what they are (issue 12, items 1 and 8).
BAD_PLANS.update(
    {
        "NUL in a description": (
            _bad(_one_phase(description="a\u0000b")),
            "tiers[0].phases[0].description: contains a NUL character",
        ),
        "NUL in an acceptance criterion": (
            _bad(_one_phase(acceptance_criteria=["ok", "a\u0000b"])),
            "tiers[0].phases[0].acceptance_criteria[1]: contains a NUL character",
        ),
        "NUL in the workspace": (
            _bad(plan_dict(workspace="ws\u0000x")),
            "workspace: contains a NUL character",
        ),
        "NUL in a YAML description": (
            YAML_DESCRIPTION.format('"a\\0b"').encode(),
            "tiers[0].phases[0].description: contains a NUL character",
        ),
        "lone surrogate in a plan name": (
            _bad(plan_dict(name="\udfff")),
            "name: contains a lone surrogate (U+DFFF)",
        ),
        "lone surrogate in a description": (
            _bad(_one_phase(description="x\ud800y")),
            "tiers[0].phases[0].description: contains a lone surrogate (U+D800)",
        ),
        "lone surrogate in a YAML description": (
            YAML_DESCRIPTION.format('"x\\uDFFFy"').encode(),
            "tiers[0].phases[0].description: contains a lone surrogate (U+DFFF)",
        ),
        "workspace that is the root itself": (
            _bad(plan_dict(workspace=".")),
            "workspace: must name a folder under AUTOPACK_WORKSPACE_ROOT",
        ),
        "workspace that normalises to the root": (
            _bad(plan_dict(workspace="./.")),
            "workspace: must name a folder under AUTOPACK_WORKSPACE_ROOT",
        ),
        "workspace of dots and slashes": (
            _bad(plan_dict(workspace=".//./")),
            "workspace: must name a folder under AUTOPACK_WORKSPACE_ROOT",
        ),
        "right-to-left override in a plan name": (
            _bad(plan_dict(name="invoice\u202egpj.exe")),
            "name: contains an invisible or direction-changing character (U+202E)",
        ),
        "zero-width space in a tier name": (
            _bad(plan_dict(tiers=[{"name": "T\u200b1", "phases": [_phase_p()]}])),
            "tiers[0].name: contains an invisible or direction-changing character (U+200B)",
        ),
        "right-to-left isolate in a phase name": (
            _bad(_one_phase(name="a\u2067b")),
            "tiers[0].phases[0].name: contains an invisible or direction-changing character",
        ),
        "control character in a phase name": (
            _bad(_one_phase(name="a\tb")),
            "tiers[0].phases[0].name: contains a control character (U+0009)",
        ),
        "bidi override in the workspace": (
            _bad(plan_dict(workspace="ws\u202ex")),
            "workspace: contains an invisible or direction-changing character (U+202E)",
        ),
        "workspace named like the runs' trees": (
            _bad(plan_dict(workspace=".runs/x")),
            "workspace: .runs is where Autopack keeps the runs' own working trees",
        ),
        "protected path with ..": (
            _bad(plan_dict(protected_paths=["../secrets"])),
            "protected_paths[0]: protected path pattern '../secrets' contains '..'",
        ),
        "protected path not text": (
            _bad(plan_dict(protected_paths=[3])),
            "protected_paths[0]: expected text, got int",
        ),
        "check with a NUL": (
            _bad(plan_dict(checks=["pytest\u0000"])),
            "checks[0]: contains a NUL character",
        ),
        "check on two lines": (
            _bad(plan_dict(checks=["pytest\nrm -rf /"])),
            "checks[0]: contains a control character (U+000A)",
        ),
        "phase check empty": (
            _bad(plan_dict(tiers=[{"name": "T", "phases": [{**_phase_p(), "checks": ["  "]}]}])),
            "tiers[0].phases[0].checks[0]: must not be empty",
        ),
        "too many checks": (
            _bad(plan_dict(checks=["true"] * 21)),
            "checks: a list of at most 20 commands",
        ),
        "source and workspace": (
            _bad(plan_dict(workspace="ws", source="/srv/repo")),
            "source: ",
        ),
        "relative source": (
            _bad(plan_dict(source="repo")),
            "source: must be an absolute path without '..' to a local git repository",
        ),
        "guard for a provider that does not exist": (
            _bad(plan_dict(guards=_guard("openrouter"))),
            "guards[0].provider: 'openrouter' is not a provider in the catalogue "
            "(one of anthropic, glm, google_gemini, openai)",
        ),
        # 1e300 is finite but too large to keep to two decimals: refused, not a crash.
        "guard percent far too large": (
            _bad(plan_dict(guards=[{**_guard("anthropic")[0], "threshold_percent": 1e300}])),
            "guards[0].threshold_percent: a number above 0 and at most 100",
        ),
    }
)


@pytest.mark.django_db  # a guard's provider is checked against the catalogue in the database
@pytest.mark.parametrize("case", list(BAD_PLANS), ids=list(BAD_PLANS))
def test_a_bad_plan_is_refused_with_a_message_naming_the_place(case: str) -> None:
    raw, message = BAD_PLANS[case]
    with pytest.raises(PlanError) as info:
        parse_plan_bytes(raw, filename="plan.json" if raw.startswith(b"{") else "plan.yaml")
    assert message in str(info.value)


@pytest.mark.django_db
@pytest.mark.parametrize("case", list(BAD_PLANS), ids=list(BAD_PLANS))
def test_start_run_refuses_a_bad_plan_and_writes_nothing(case: str, tmp_path: Path) -> None:
    raw, message = BAD_PLANS[case]
    path = tmp_path / ("plan.json" if raw.startswith(b"{") else "plan.yaml")
    path.write_bytes(raw)
    with pytest.raises(CommandError) as info:
        call_command("start_run", str(path))
    assert message in str(info.value)
    assert (Run.objects.count(), Tier.objects.count(), Phase.objects.count()) == (0, 0, 0)


def test_a_plan_carries_its_checks_and_protected_paths_to_the_run_and_its_phases(
    db: None,
) -> None:
    from runs.services import run_create

    raw = plan_dict(checks=["python -m pytest -q"], protected_paths=["migrations/**", "/setup.py"])
    raw["tiers"][0]["phases"][0]["checks"] = "ruff check ."
    plan = parse_plan_bytes(json.dumps(raw))
    assert plan.as_dict()["checks"] == ["python -m pytest -q"]
    run = run_create(plan=plan)
    assert (run.check_commands, run.protected_paths) == (
        ["python -m pytest -q"],
        ["migrations/**", "/setup.py"],
    )
    p1, p2 = run.phases.order_by("position")
    assert (p1.check_commands, p2.check_commands) == (["ruff check ."], [])


def test_a_source_outside_the_allowed_roots_is_refused(settings: object, tmp_path: Path) -> None:
    settings.AUTOPACK_SOURCE_ROOTS = ""  # type: ignore[attr-defined]
    with pytest.raises(PlanError, match="set AUTOPACK_SOURCE_ROOTS"):
        parse_plan_bytes(json.dumps(plan_dict(source=str(tmp_path))))
    settings.AUTOPACK_SOURCE_ROOTS = str(tmp_path / "allowed")  # type: ignore[attr-defined]
    with pytest.raises(PlanError, match="not under an allowed root"):
        parse_plan_bytes(json.dumps(plan_dict(source=str(tmp_path / "other"))))
    plan = parse_plan_bytes(json.dumps(plan_dict(source=str(tmp_path / "allowed" / "repo"))))
    assert plan.source == str(tmp_path / "allowed" / "repo") and plan.workspace == ""


def test_a_workspace_written_with_the_roots_own_path_means_the_folder_under_it(
    settings: object,
) -> None:
    # The example plan once said `.autopack/workspaces/team-invitations`, which landed in
    # `.autopack/workspaces/.autopack/workspaces/team-invitations`.
    base = Path(settings.BASE_DIR)  # type: ignore[attr-defined]
    settings.AUTOPACK_WORKSPACE_ROOT = base / ".autopack" / "workspaces"  # type: ignore[attr-defined]
    plan = parse_plan_bytes(
        json.dumps(plan_dict(workspace=".autopack/workspaces/team-invitations"))
    )
    assert plan.workspace == "team-invitations"
    assert parse_plan_bytes(json.dumps(plan_dict(workspace="team-invitations"))).workspace == (
        "team-invitations"
    )

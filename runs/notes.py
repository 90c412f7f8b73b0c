"""Notes to the supervisor and the run's workspace files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from routing.text import text_problem

from .models import HumanNote, Run

MAX_NOTE = 10_000
NOTES_FILE = Path(".autopack") / "human_notes.md"


class NoteError(ValueError):
    """A note is refused; nothing was stored or written."""


def workspace_path(run: Run) -> Path:
    """The run's workspace, always inside AUTOPACK_WORKSPACE_ROOT."""
    root = Path(settings.AUTOPACK_WORKSPACE_ROOT).resolve()
    path = (root / run.workspace).resolve()
    # Plans are validated on import, but the row could have been edited since: check again
    # after resolving links, so nothing is ever written outside the root.
    if path != root and root not in path.parents:
        raise NoteError(f"workspace {run.workspace!r} is outside the workspace root")
    if path == root:
        # Every run whose workspace is the root would share one notes file.
        raise NoteError(f"workspace {run.workspace!r} is the workspace root itself")
    return path


def notes_file(run: Run) -> Path:
    base = workspace_path(run)
    path = base / NOTES_FILE
    # Resolved, it must be the very same path: a symlink for `.autopack` or for the notes file
    # (anything in the workspace can be written by the builder's tools) would lead the note
    # somewhere else on the machine.
    if path.resolve() != path:
        raise NoteError("the notes file must stay inside the workspace's .autopack folder")
    return path


@transaction.atomic
def run_note_add(*, run_id: int, text: str, author: Any = None) -> HumanNote:
    text = (text or "").strip()
    if not text:
        raise NoteError("text: a note cannot be empty")
    if len(text) > MAX_NOTE:
        raise NoteError(f"text: at most {MAX_NOTE:,} characters")
    if problem := text_problem(text):
        raise NoteError(f"text: {problem}")
    run = Run.objects.select_for_update().get(pk=run_id)
    path = notes_file(run)
    note = HumanNote.objects.create(run=run, text=text, author=author)
    Run.objects.filter(pk=run.pk).update(note_count=F("note_count") + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    who = getattr(author, "username", "") or "someone"
    stamp = timezone.localtime(note.created_at).strftime("%Y-%m-%d %H:%M %Z")
    # Written inside the transaction: if the file cannot be written the note is not kept
    # either, so the database and the file never disagree.
    with path.open("a", encoding="utf-8") as fh:
        fh.write(f"\n## {stamp} — {who}\n\n{text}\n")
    return note


def run_notes_text(*, run_id: int) -> str:
    return "\n\n".join(HumanNote.objects.filter(run_id=run_id).values_list("text", flat=True))

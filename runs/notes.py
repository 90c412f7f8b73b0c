"""Notes to the supervisor: stored, appended to the run's notes file, given to the builder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from routing.text import text_problem

from .models import HumanNote, Run
from .workspace import RUNS_DIR

MAX_NOTE = 10_000
NOTES_DIR = "notes"  # under AUTOPACK_WORKSPACE_ROOT/.runs, beside the runs' trees


class NoteError(ValueError):
    """A note is refused; nothing was stored or written."""


def notes_file(run: Run) -> Path:
    """The run's own notes file: `AUTOPACK_WORKSPACE_ROOT/.runs/notes/run-<id>.md`.

    Outside the run's git tree on purpose: every attempt restores the tree to its savepoint
    (untracked files removed), and the checks run model-written code with the tree writable.
    Per run, not per workspace: two runs of one plan share a repository, never their notes.
    Nothing in the path comes from the plan, so no plan can lead a note elsewhere."""
    root = Path(settings.AUTOPACK_WORKSPACE_ROOT).resolve()
    folder = root / RUNS_DIR / NOTES_DIR
    path = folder / f"run-{int(run.pk)}.md"
    # Resolved, it must be the very same path: a symlink planted for the folder or the file
    # would lead the note somewhere else on the machine.
    if path.resolve() != path:
        raise NoteError(f"the notes file {path} must not be reached through a symlink")
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

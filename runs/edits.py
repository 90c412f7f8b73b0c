"""The builder's edit format and its strict parser (issue 13; the format is in docs/edits.md).

A builder's reply changes files only through three kinds of block, each opened by a marker
line that carries the kind and the path, so no block depends on a line around it:

    <<<<<<< WRITE path/to/file.py        the file's whole new content (creates or replaces)
    ...
    >>>>>>> END

    <<<<<<< SEARCH path/to/file.py       lines that occur exactly once in the file ...
    ...
    =======
    ...                                  ... and the lines that take their place
    >>>>>>> REPLACE

    <<<<<<< DELETE path/to/file.py       one line: the file is removed

The markers are Aider's SEARCH/REPLACE markers (models have seen them a great deal), but the
path is on the opening line instead of the line before it: Aider has to guess which line above
a fence is the path, we never do. Everything outside blocks is commentary and ignored, except a
line that looks like a marker and is not a valid one, which is an error: a model that misspells
a marker must hear about it, not have its change silently dropped.

Parsing is strict and every error is one `EditError` whose message names the block number, its
kind, its path and the line, and what is wrong, so it can go back to the builder verbatim as a
revise. The same exception is raised by runs.workspace when a parsed edit cannot be applied.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

OPEN = "<<<<<<<"
DIVIDER = "======="
CLOSE = ">>>>>>>"
END_WRITE = ">>>>>>> END"
END_REPLACE = ">>>>>>> REPLACE"
KINDS = ("WRITE", "SEARCH", "DELETE")

# Path limits of common Linux file systems (NAME_MAX, PATH_MAX), in UTF-8 bytes.
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096

# A line that starts like a marker: five or more '<' or '>' (a model that types six chevrons
# instead of seven, or "<<<<<<< Write"). Runs of '=' are left alone outside blocks: they are
# also markdown headings in commentary.
_MARKERISH = re.compile(r"^(<{5,}|>{5,})")
_DRIVE = re.compile(r"^[A-Za-z]:")


class EditError(ValueError):
    """The builder's edits are refused: nothing was applied. The message is meant for the
    builder (it goes back as a revise) and for the person reading the phase."""


@dataclass(frozen=True)
class FileWrite:
    """The file's whole new content; creates the file (and its folders) when missing."""

    path: str
    content: str
    block: int = 0  # 1-based position in the reply, for error messages (0: built in code)
    line: int = 0

    kind = "WRITE"


@dataclass(frozen=True)
class TextReplace:
    """`search` (whole lines) occurs exactly once in the file and becomes `replace`."""

    path: str
    search: str
    replace: str
    block: int = 0
    line: int = 0

    kind = "SEARCH"


@dataclass(frozen=True)
class FileDelete:
    path: str
    block: int = 0
    line: int = 0

    kind = "DELETE"


Edit = FileWrite | TextReplace | FileDelete


def where(edit: Edit) -> str:
    """How an error names the edit: 'block 3 (SEARCH src/app.py, line 12)'."""
    if edit.block:
        return f"block {edit.block} ({edit.kind} {edit.path}, line {edit.line})"
    return f"{edit.kind} {edit.path}"


def path_problem(path: str) -> str | None:
    """Why `path` (as the builder wrote it) cannot name a file in the workspace, or None.
    Only the text is judged here; runs.workspace also checks what is on disk (symlinks)."""
    if not path:
        return "the path is empty"
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "`'\"":
        return f"the path is quoted ({path}); write it bare: {path[1:-1]}"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in path):
        return "the path contains a control or invisible formatting character"
    if path.startswith("/") or _DRIVE.match(path):
        return "the path is absolute; paths are relative to the workspace root"
    if path.startswith("~"):
        return "the path starts with '~'; paths are relative to the workspace root"
    if "\\" in path:
        return "the path contains a backslash; separate folders with '/'"
    if path.endswith("/"):
        return "the path ends with '/', so it names a folder, not a file"
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        return "the path names the workspace root, not a file"
    if ".." in parts:
        return "the path contains '..'; it must stay inside the workspace"
    if any(p.casefold() == ".git" for p in parts):
        return "the path is inside .git/; git's own files cannot be edited"
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return f"the path is longer than {MAX_PATH_BYTES} bytes"
    if any(len(p.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES for p in parts):
        return f"a path component is longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def normalise_path(path: str) -> str:
    """`./src//app.py` → `src/app.py` (call after path_problem returned None)."""
    return "/".join(p for p in path.split("/") if p not in ("", "."))


@dataclass
class _Open:
    kind: str
    path: str
    block: int
    line: int
    search: list[str] | None = None  # a SEARCH block's search lines, once its divider is read
    body: list[str] = field(default_factory=list)

    def where(self) -> str:
        return f"block {self.block} ({self.kind} {self.path}, line {self.line})"


def _marker(line: str) -> str:
    # Trailing blanks after a marker are forgiven (models add them); nothing else is.
    return line.rstrip(" \t")


def _opening(line: str, number: int, block: int) -> _Open:
    rest = line[len(OPEN) :]
    if not rest.startswith(" "):
        raise EditError(
            f"line {number}: malformed marker {line[:40]!r}; a block opens with "
            f"'{OPEN} WRITE path', '{OPEN} SEARCH path' or '{OPEN} DELETE path'"
        )
    kind, _, raw_path = rest.strip().partition(" ")
    if kind not in KINDS:
        raise EditError(
            f"line {number}: unknown block kind {kind[:20]!r}; expected WRITE, SEARCH or DELETE "
            "(in capitals)"
        )
    path = raw_path.strip()
    label = f"block {block} ({kind} {path or '?'}, line {number})"
    if problem := path_problem(path):
        raise EditError(f"{label}: {problem}")
    return _Open(kind=kind, path=normalise_path(path), block=block, line=number)


def parse_edits(text: str, *, allow_empty: bool = False) -> list[Edit]:
    """The edits of a builder's reply, in order. Raises EditError on the first problem.

    CR LF line ends in the reply are read as LF. A WRITE's content is its lines, each ended by
    a newline (no lines: an empty file); SEARCH and REPLACE texts likewise, and a search text
    matches whole lines only (runs.workspace)."""
    lines = text.replace("\r\n", "\n").split("\n")
    # A reply that ends with a newline has an empty last "line" that is not a line.
    if lines and lines[-1] == "":
        lines.pop()
    edits: list[Edit] = []
    current: _Open | None = None
    blocks = 0
    for index, raw in enumerate(lines):
        number = index + 1
        marker = _marker(raw)
        if current is None:
            if marker.startswith(OPEN) and not marker.startswith(OPEN + "<"):
                blocks += 1
                opened = _opening(marker, number, blocks)
                if opened.kind == "DELETE":
                    edits.append(FileDelete(path=opened.path, block=blocks, line=number))
                else:
                    current = opened
                continue
            if marker in (DIVIDER, END_WRITE, END_REPLACE) or _MARKERISH.match(marker):
                raise EditError(
                    f"line {number}: {marker[:40]!r} outside any block; every block opens "
                    f"with '{OPEN} WRITE path', '{OPEN} SEARCH path' or '{OPEN} DELETE path'"
                )
            continue  # commentary

        if marker.startswith(OPEN + " ") and marker[len(OPEN) + 1 :].split(" ", 1)[0] in KINDS:
            raise EditError(
                f"{current.where()}: not closed before line {number}, which opens another "
                f"block; close it with '{_closing(current)}'"
            )
        if current.kind == "WRITE":
            if marker == END_WRITE:
                edits.append(
                    FileWrite(
                        path=current.path,
                        content=_joined(current.body),
                        block=current.block,
                        line=current.line,
                    )
                )
                current = None
            elif marker == END_REPLACE:
                # A '=======' line is content here (a heading's underline, say): only the
                # closing marker of the other kind is surely a mix-up.
                raise EditError(
                    f"{current.where()}: line {number} is {marker!r}, which closes SEARCH "
                    f"blocks; a WRITE block holds the whole file and closes with '{END_WRITE}'"
                )
            else:
                current.body.append(raw)
            continue

        # SEARCH block: the search part until the divider, then the replacement.
        if current.search is None:
            if marker == DIVIDER:
                if not current.body:
                    raise EditError(
                        f"{current.where()}: the search text is empty; to create a file use "
                        f"WRITE, to add lines search for the lines next to them"
                    )
                current.search, current.body = current.body, []
            elif marker in (END_REPLACE, END_WRITE):
                raise EditError(
                    f"{current.where()}: line {number} closes the block before its "
                    f"'{DIVIDER}' divider; a SEARCH block is: search lines, '{DIVIDER}', "
                    f"replacement lines, '{END_REPLACE}'"
                )
            else:
                current.body.append(raw)
            continue
        if marker == END_REPLACE:
            edits.append(
                TextReplace(
                    path=current.path,
                    search=_joined(current.search),
                    replace=_joined(current.body),
                    block=current.block,
                    line=current.line,
                )
            )
            current = None
        elif marker == DIVIDER:
            raise EditError(
                f"{current.where()}: a second '{DIVIDER}' divider at line {number}; one SEARCH "
                "block holds one search and one replacement (use another block for another "
                "change, or WRITE the whole file if it contains such a line)"
            )
        elif marker == END_WRITE:
            raise EditError(
                f"{current.where()}: line {number} is '{END_WRITE}'; a SEARCH block closes "
                f"with '{END_REPLACE}'"
            )
        else:
            current.body.append(raw)

    if current is not None:
        raise EditError(
            f"{current.where()}: unterminated; the reply ends before '{_closing(current)}'"
            + (f" (its '{DIVIDER}' divider is missing too)" if _missing_divider(current) else "")
        )
    if not edits and not allow_empty:
        raise EditError(
            "the reply has no edit blocks; change files with WRITE, SEARCH/REPLACE or DELETE "
            "blocks as the instructions describe"
        )
    _check_conflicts(edits)
    return edits


def _closing(block: _Open) -> str:
    return END_WRITE if block.kind == "WRITE" else END_REPLACE


def _missing_divider(block: _Open) -> bool:
    return block.kind == "SEARCH" and block.search is None


def _joined(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _check_conflicts(edits: list[Edit]) -> None:
    """One file is either written whole, edited by SEARCH blocks or deleted in one reply, and
    no file is also a folder of another: anything else has no single meaning."""
    first: dict[str, Edit] = {}
    replaces: dict[tuple[str, str, str], TextReplace] = {}
    for edit in edits:
        earlier = first.get(edit.path)
        if earlier is None:
            first[edit.path] = edit
        elif not (isinstance(edit, TextReplace) and isinstance(earlier, TextReplace)):
            raise EditError(
                f"{where(edit)}: conflicts with {where(earlier)}; in one reply a file is "
                "either written whole (once), edited by SEARCH blocks, or deleted"
            )
        if isinstance(edit, TextReplace):
            key = (edit.path, edit.search, edit.replace)
            if key in replaces:
                raise EditError(f"{where(edit)}: repeats {where(replaces[key])}")
            replaces[key] = edit
    for path, edit in first.items():
        parts = path.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in first:
                raise EditError(
                    f"{where(edit)}: conflicts with {where(first[folder])}; {folder} cannot be "
                    "both a file and a folder"
                )


def format_edits(edits: list[Edit]) -> str:
    """The reply text for `edits` (the inverse of parse_edits), e.g. for the simulated builder
    and for tests. Refuses content the format cannot carry."""
    out: list[str] = []
    for edit in edits:
        if problem := path_problem(edit.path):
            raise EditError(f"{where(edit)}: {problem}")
        if isinstance(edit, FileDelete):
            out.append(f"{OPEN} DELETE {edit.path}\n")
        elif isinstance(edit, FileWrite):
            out += [
                f"{OPEN} WRITE {edit.path}\n",
                _carried(edit, edit.content, divider_ok=True),
                END_WRITE + "\n",
            ]
        else:
            out += [
                f"{OPEN} SEARCH {edit.path}\n",
                _carried(edit, edit.search),
                DIVIDER + "\n",
                _carried(edit, edit.replace),
                END_REPLACE + "\n",
            ]
    return "".join(out)


def _carried(edit: Edit, text: str, *, divider_ok: bool = False) -> str:
    if text and not text.endswith("\n"):
        raise EditError(f"{where(edit)}: text must end with a newline to be carried")
    for line in text.split("\n"):
        marker = _marker(line)
        if (
            marker in (END_WRITE, END_REPLACE)
            or (marker == DIVIDER and not divider_ok)
            or (marker.startswith(OPEN + " ") and marker[len(OPEN) + 1 :].split(" ", 1)[0] in KINDS)
        ):
            raise EditError(f"{where(edit)}: a line of the text is a marker ({marker!r})")
    return text


FORMAT_INSTRUCTIONS = f"""\
Change files ONLY with the blocks below; text outside blocks is commentary and changes nothing.
Paths are relative to the repository root, written bare (no quotes), with '/' between folders.

Replace or create a whole file (every line of the new content; nothing elided):
{OPEN} WRITE path/to/file.py
...the complete new content...
{END_WRITE}

Change part of an existing file: the search lines must be copied exactly (whole lines, same
indentation) and occur exactly once in the file; they are replaced by the lines after the
divider (which may be none, to remove lines):
{OPEN} SEARCH path/to/file.py
...exact existing lines...
{DIVIDER}
...new lines...
{END_REPLACE}

Delete a file (one line, nothing else):
{OPEN} DELETE path/to/file.py

Rules: markers start the line, with exactly seven '<', '=' or '>'. Do not put markdown fences
inside a block. Several SEARCH blocks may change one file (applied in order), but a file is
written, or edited, or deleted, not two of these. A line of content cannot be a marker line
(a '=======' line can only be written with WRITE). All edits apply together or not at all.

Example:
{OPEN} SEARCH app/greet.py
def greet(name):
    return "Hello " + name
{DIVIDER}
def greet(name: str) -> str:
    return f"Hello, {{name}}!"
{END_REPLACE}
{OPEN} WRITE tests/test_greet.py
from app.greet import greet


def test_greet():
    assert greet("Ada") == "Hello, Ada!"
{END_WRITE}
{OPEN} DELETE app/old_greet.py
"""

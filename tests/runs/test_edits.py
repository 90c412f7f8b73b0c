"""The builder's edit format (runs/edits.py, docs/edits.md): what parses, and the exact error
for every malformed reply."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from runs.edits import (
    FORMAT_INSTRUCTIONS,
    EditError,
    FileDelete,
    FileWrite,
    TextReplace,
    format_edits,
    parse_edits,
)


def test_a_reply_with_write_search_and_delete_blocks_parses_into_edits_in_order() -> None:
    reply = (
        "I add a greeting and remove the old module.\n"
        "<<<<<<< SEARCH app/greet.py\n"
        "def greet(name):\n"
        "    return 'hi ' + name\n"
        "=======\n"
        "def greet(name: str) -> str:\n"
        "    return f'Hello, {name}!'\n"
        ">>>>>>> REPLACE\n"
        "\n"
        "<<<<<<< WRITE ./tests//test_greet.py\n"
        "from app.greet import greet\n"
        "\n"
        "def test_it():\n"
        "    assert greet('Ada') == 'Hello, Ada!'\n"
        ">>>>>>> END\n"
        "<<<<<<< DELETE app/old.py\n"
        "Done.\n"
    )
    assert parse_edits(reply) == [
        TextReplace(
            path="app/greet.py",
            search="def greet(name):\n    return 'hi ' + name\n",
            replace="def greet(name: str) -> str:\n    return f'Hello, {name}!'\n",
            block=1,
            line=2,
        ),
        FileWrite(
            path="tests/test_greet.py",
            content="from app.greet import greet\n\ndef test_it():\n"
            "    assert greet('Ada') == 'Hello, Ada!'\n",
            block=2,
            line=10,
        ),
        FileDelete(path="app/old.py", block=3, line=16),
    ]


def test_crlf_line_ends_and_blanks_after_markers_are_forgiven() -> None:
    reply = "<<<<<<< WRITE a.txt  \r\none\r\ntwo\r\n>>>>>>> END \r\n"
    assert parse_edits(reply) == [FileWrite(path="a.txt", content="one\ntwo\n", block=1, line=1)]


def test_an_empty_write_block_is_an_empty_file_and_an_empty_replacement_removes_lines() -> None:
    reply = (
        "<<<<<<< WRITE empty.txt\n>>>>>>> END\n"
        "<<<<<<< SEARCH a.py\nx = 1\n=======\n>>>>>>> REPLACE\n"
    )
    edits = parse_edits(reply)
    assert edits[0] == FileWrite(path="empty.txt", content="", block=1, line=1)
    assert isinstance(edits[1], TextReplace) and edits[1].replace == ""


def test_a_divider_line_and_foreign_conflict_markers_are_content_in_a_write_block() -> None:
    reply = "<<<<<<< WRITE README.rst\nTitle\n=======\n<<<<<<< HEAD\n>>>>>>> END\n"
    assert parse_edits(reply)[0].content == "Title\n=======\n<<<<<<< HEAD\n"  # type: ignore[union-attr]


def test_several_search_blocks_may_edit_one_file() -> None:
    reply = (
        "<<<<<<< SEARCH a.py\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE\n"
        "<<<<<<< SEARCH a.py\ny = 1\n=======\ny = 2\n>>>>>>> REPLACE\n"
    )
    assert [e.path for e in parse_edits(reply)] == ["a.py", "a.py"]


def test_a_reply_without_blocks_is_refused_unless_an_empty_change_is_allowed() -> None:
    with pytest.raises(EditError) as caught:
        parse_edits("I changed app.py to greet politely.")
    assert str(caught.value) == (
        "the reply has no edit blocks; change files with WRITE, SEARCH/REPLACE or DELETE "
        "blocks as the instructions describe"
    )
    assert parse_edits("Nothing to change.", allow_empty=True) == []


MALFORMED = {
    "unterminated write": (
        "<<<<<<< WRITE a.py\nx = 1\n",
        "block 1 (WRITE a.py, line 1): unterminated; the reply ends before '>>>>>>> END'",
    ),
    "unterminated search without its divider": (
        "ok\n<<<<<<< SEARCH a.py\nx = 1\n",
        "block 1 (SEARCH a.py, line 2): unterminated; the reply ends before '>>>>>>> REPLACE' "
        "(its '=======' divider is missing too)",
    ),
    "unterminated search after its divider": (
        "<<<<<<< SEARCH a.py\nx = 1\n=======\nx = 2\n",
        "block 1 (SEARCH a.py, line 1): unterminated; the reply ends before '>>>>>>> REPLACE'",
    ),
    "a block opened inside another": (
        "<<<<<<< WRITE a.py\nx = 1\n<<<<<<< WRITE b.py\ny\n>>>>>>> END\n",
        "block 1 (WRITE a.py, line 1): not closed before line 3, which opens another block; "
        "close it with '>>>>>>> END'",
    ),
    "a closing marker outside any block": (
        "text\n>>>>>>> REPLACE\n",
        "line 2: '>>>>>>> REPLACE' outside any block; every block opens with "
        "'<<<<<<< WRITE path', '<<<<<<< SEARCH path' or '<<<<<<< DELETE path'",
    ),
    "six chevrons": (
        "<<<<<< WRITE a.py\nx\n>>>>>>> END\n",
        "line 1: '<<<<<< WRITE a.py' outside any block; every block opens with "
        "'<<<<<<< WRITE path', '<<<<<<< SEARCH path' or '<<<<<<< DELETE path'",
    ),
    "an unknown block kind": (
        "<<<<<<< EDIT a.py\n",
        "line 1: unknown block kind 'EDIT'; expected WRITE, SEARCH or DELETE (in capitals)",
    ),
    "a kind in lower case": (
        "<<<<<<< write a.py\n",
        "line 1: unknown block kind 'write'; expected WRITE, SEARCH or DELETE (in capitals)",
    ),
    "no space after the chevrons": (
        "<<<<<<<WRITE a.py\n",
        "line 1: malformed marker '<<<<<<<WRITE a.py'; a block opens with '<<<<<<< WRITE path', "
        "'<<<<<<< SEARCH path' or '<<<<<<< DELETE path'",
    ),
    "a search block closed like a write block": (
        "<<<<<<< SEARCH a.py\nx\n=======\ny\n>>>>>>> END\n",
        "block 1 (SEARCH a.py, line 1): line 5 is '>>>>>>> END'; a SEARCH block closes with "
        "'>>>>>>> REPLACE'",
    ),
    "a search block closed before its divider": (
        "<<<<<<< SEARCH a.py\nx\n>>>>>>> REPLACE\n",
        "block 1 (SEARCH a.py, line 1): line 3 closes the block before its '=======' divider; a "
        "SEARCH block is: search lines, '=======', replacement lines, '>>>>>>> REPLACE'",
    ),
    "a second divider": (
        "<<<<<<< SEARCH a.py\nx\n=======\ny\n=======\nz\n>>>>>>> REPLACE\n",
        "block 1 (SEARCH a.py, line 1): a second '=======' divider at line 5; one SEARCH block "
        "holds one search and one replacement (use another block for another change, or WRITE "
        "the whole file if it contains such a line)",
    ),
    "a write block closed like a search block": (
        "<<<<<<< WRITE a.py\nx\n>>>>>>> REPLACE\n",
        "block 1 (WRITE a.py, line 1): line 3 is '>>>>>>> REPLACE', which closes SEARCH blocks; "
        "a WRITE block holds the whole file and closes with '>>>>>>> END'",
    ),
    "an empty search text": (
        "<<<<<<< SEARCH a.py\n=======\nx\n>>>>>>> REPLACE\n",
        "block 1 (SEARCH a.py, line 1): the search text is empty; to create a file use WRITE, "
        "to add lines search for the lines next to them",
    ),
    "an empty path": (
        "<<<<<<< WRITE \nx\n>>>>>>> END\n",
        "block 1 (WRITE ?, line 1): the path is empty",
    ),
    "a quoted path": (
        "<<<<<<< DELETE `a.py`\n",
        "block 1 (DELETE `a.py`, line 1): the path is quoted (`a.py`); write it bare: a.py",
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_reply_is_refused_with_a_message_naming_block_path_and_problem(
    name: str,
) -> None:
    reply, message = MALFORMED[name]
    with pytest.raises(EditError) as caught:
        parse_edits(reply)
    assert str(caught.value) == message


ESCAPES = {
    "/etc/passwd": "the path is absolute; paths are relative to the workspace root",
    "C:/Windows/x.py": "the path is absolute; paths are relative to the workspace root",
    "../outside.py": "the path contains '..'; it must stay inside the workspace",
    "app/../../outside.py": "the path contains '..'; it must stay inside the workspace",
    ".git/config": "the path is inside .git/; git's own files cannot be edited",
    "vendor/.GIT/hooks/pre-commit": "the path is inside .git/; git's own files cannot be edited",
    "~/.ssh/authorized_keys": "the path starts with '~'; paths are relative to the workspace root",
    "app\\evil.py": "the path contains a backslash; separate folders with '/'",
    "app/": "the path ends with '/', so it names a folder, not a file",
    "./.": "the path names the workspace root, not a file",
    "app/\u202egpj.py": "the path contains a control or invisible formatting character",
}


@pytest.mark.parametrize("path", sorted(ESCAPES))
def test_a_path_that_leaves_the_workspace_or_enters_git_is_refused(path: str) -> None:
    with pytest.raises(EditError) as caught:
        parse_edits(f"<<<<<<< WRITE {path}\nx\n>>>>>>> END\n")
    assert str(caught.value) == f"block 1 (WRITE {path}, line 1): {ESCAPES[path]}"


CONFLICTS = {
    "a file written twice": (
        "<<<<<<< WRITE a.py\nx\n>>>>>>> END\n<<<<<<< WRITE ./a.py\ny\n>>>>>>> END\n",
        "block 2 (WRITE a.py, line 4): conflicts with block 1 (WRITE a.py, line 1); in one reply "
        "a file is either written whole (once), edited by SEARCH blocks, or deleted",
    ),
    "a file written and deleted": (
        "<<<<<<< WRITE a.py\nx\n>>>>>>> END\n<<<<<<< DELETE a.py\n",
        "block 2 (DELETE a.py, line 4): conflicts with block 1 (WRITE a.py, line 1); in one "
        "reply a file is either written whole (once), edited by SEARCH blocks, or deleted",
    ),
    "a file edited and then written": (
        "<<<<<<< SEARCH a.py\nx\n=======\ny\n>>>>>>> REPLACE\n<<<<<<< WRITE a.py\nz\n>>>>>>> END\n",
        "block 2 (WRITE a.py, line 6): conflicts with block 1 (SEARCH a.py, line 1); in one "
        "reply a file is either written whole (once), edited by SEARCH blocks, or deleted",
    ),
    "the same search block twice": (
        "<<<<<<< SEARCH a.py\nx\n=======\ny\n>>>>>>> REPLACE\n"
        "<<<<<<< SEARCH a.py\nx\n=======\ny\n>>>>>>> REPLACE\n",
        "block 2 (SEARCH a.py, line 6): repeats block 1 (SEARCH a.py, line 1)",
    ),
    "a path that is both a file and a folder": (
        "<<<<<<< WRITE app\nx\n>>>>>>> END\n<<<<<<< WRITE app/a.py\ny\n>>>>>>> END\n",
        "block 2 (WRITE app/a.py, line 4): conflicts with block 1 (WRITE app, line 1); app "
        "cannot be both a file and a folder",
    ),
}


@pytest.mark.parametrize("name", sorted(CONFLICTS))
def test_edits_that_conflict_with_each_other_are_refused(name: str) -> None:
    reply, message = CONFLICTS[name]
    with pytest.raises(EditError) as caught:
        parse_edits(reply)
    assert str(caught.value) == message


def test_the_example_in_the_format_instructions_parses() -> None:
    example = FORMAT_INSTRUCTIONS.split("Example:\n", 1)[1]
    edits = parse_edits(example)
    assert [(e.kind, e.path) for e in edits] == [
        ("SEARCH", "app/greet.py"),
        ("WRITE", "tests/test_greet.py"),
        ("DELETE", "app/old_greet.py"),
    ]
    assert format_edits(edits) == example


_LINE = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
    max_size=30,
).filter(lambda line: not line.rstrip(" \t").startswith(("<<<<<", ">>>>>", "=======")))
_TEXT = st.lists(_LINE, max_size=8).map(lambda lines: "".join(f"{x}\n" for x in lines))
_PATH = st.from_regex(r"[a-z][a-z0-9_]{0,8}(/[a-z0-9_]{1,8}){0,2}\.(py|md|txt)", fullmatch=True)


@hyp_settings(max_examples=200, deadline=None)
@given(
    writes=st.dictionaries(_PATH.filter(lambda p: not p.startswith("zz")), _TEXT, max_size=4),
    search=_TEXT.filter(bool),
    replace=_TEXT,
)
def test_whatever_format_edits_writes_parses_back_to_the_same_edits(
    writes: dict[str, str], search: str, replace: str
) -> None:
    edits: list[FileWrite | TextReplace | FileDelete] = [
        FileWrite(path=p, content=c) for p, c in writes.items()
    ]
    edits.append(TextReplace(path="zz/edited.py", search=search, replace=replace))
    edits.append(FileDelete(path="zz/gone.py"))
    parsed = parse_edits(format_edits(edits))
    assert [(e.kind, e.path) for e in parsed] == [(e.kind, e.path) for e in edits]
    for got, want in zip(parsed, edits, strict=True):
        assert (getattr(got, "content", None), getattr(got, "search", None)) == (
            getattr(want, "content", None),
            getattr(want, "search", None),
        )
        assert getattr(got, "replace", None) == getattr(want, "replace", None)

"""The documentation runs as written: every ```python block of README.md and docs/*.md, and its links resolve.

Each block runs on its own, in a fresh namespace, as a reader pastes it into a fresh interpreter (so no block
may lean on names another one defined), from a scratch working directory. Tracebacks name the Markdown file
and its line. A block that cannot run here (e.g. one that needs a GPU) is fenced ```python no-run; there may be
at most MAX_NO_RUN of them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_NO_RUN = 2
# A fenced block: ``` or more, an info string (language, then flags), the code, the same fence closing it.
FENCE = re.compile(r"^(?P<fence>`{3,})(?P<info>[^`\n]*)\n(?P<code>.*?)^(?P=fence)[ \t]*$", re.MULTILINE | re.DOTALL)
PYTHON = {"python", "py", "python3"}
# [text](target) and ![alt](target), the target up to a space or ")"
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)[^)]*\)")


class Block(NamedTuple):
    path: Path
    line: int  # of the block's first code line
    flags: tuple[str, ...]
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        language, *flags = match["info"].split() or [""]
        if language.lower() in PYTHON:
            line = text.count("\n", 0, match.start("code")) + 1
            blocks.append(Block(path, line, tuple(flags), match["code"]))
    return blocks


BLOCKS = [block for path in DOCUMENTS for block in python_blocks(path)]


def test_the_readme_has_python_blocks_and_few_are_not_run():
    assert any(block.path.name == "README.md" for block in BLOCKS)
    skipped = [block.name for block in BLOCKS if "no-run" in block.flags]
    assert len(skipped) <= MAX_NO_RUN, f"too many ```python no-run blocks: {skipped}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if "no-run" not in b.flags], ids=lambda b: b.name)
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = "\n" * (block.line - 1) + block.code  # so that a traceback gives the Markdown file's line
    exec(compile(code, str(block.path), "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    targets = [m["target"].split("#")[0] for m in LINK.finditer(path.read_text())]
    local = [t for t in targets if t and not re.match(r"[a-z]+:", t)]
    missing = [t for t in local if not (path.parent / t).exists()]
    assert not missing, f"{path.name} links to files that are not in the repository: {missing}"
    if path.name == "README.md":
        assert "docs/design.md" in local, "the README must link the design document"

"""The documentation runs as written: every ```python block of README.md and docs/*.md, and its links resolve.

Each block runs on its own, as a reader pastes it into a fresh interpreter: in a new Python process (so no
block may lean on names another one defined, or on state such as a warn-once flag another test left), from a
scratch working directory. Tracebacks name the Markdown file and its line. A warning that the project's code
issues fails the block too (the README must not teach a pattern the package warns about; third-party warnings
are let through). A block that cannot run here (e.g. one that needs a GPU) is fenced ```python no-run; there
may be at most MAX_NO_RUN of them.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
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
# Runs one block read from stdin (argv: the Markdown file, the block's first line, the repository root).
RUNNER = """
import sys, warnings
from pathlib import Path
path, line, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
code = "\\n" * (line - 1) + sys.stdin.read()  # so that a traceback gives the Markdown file's line
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    exec(compile(code, path, "exec"), {"__name__": "__main__"})
package = root / "minillm_kernels"  # (not root: a .venv inside the checkout holds torch's own warnings)
ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if Path(w.filename).resolve().is_relative_to(package)]
if ours:
    sys.exit(f"{path}:{line}: the block makes the package warn: {ours}")
"""


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
def test_python_block_runs_as_written(block, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(block.path), str(block.line), str(ROOT)], input=block.code,
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, f"{block.name} failed:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    targets = [m["target"].split("#")[0] for m in LINK.finditer(path.read_text())]
    local = [t for t in targets if t and not re.match(r"[a-z]+:", t)]
    missing = [t for t in local if not (path.parent / t).exists()]
    assert not missing, f"{path.name} links to files that are not in the repository: {missing}"
    if path.name == "README.md":
        assert "docs/design.md" in local, "the README must link the design document"

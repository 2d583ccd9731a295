"""The documentation documents what the code does and stays navigable: the settings table in
docs/settings.md is the one scripts/env_table.py renders from the trainer, the README (a short
page) names the real commands and leads to the pages that hold the details, every relative link
resolves, and the repository's top level holds only what the layout allows."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import env_table  # noqa: E402

README = REPO_ROOT / "README.md"
SETTINGS = REPO_ROOT / "docs" / "settings.md"
README_MAX_LINES = 450
# The tracked entries allowed at the top level (GUIDE section 2: layout).
TOP_LEVEL = {"train_gpt_jepa.py", "README.md", "submission.json", "requirements.txt", "Makefile", "data", "logs",
             "scripts", "tests", "docs", "campaign", ".ci", ".gitignore"}
# The pages whose relative links must resolve: the README, every page of docs/, the campaigns' page.
LINKED_PAGES = [README, *sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "campaign" / "README.md"]
# Where each part of the documentation lives, by the headings that must be there.
SECTIONS = {
    "README.md": ["## Quickstart", "## Running", "### Several nodes", "## JEPA modes",
                  "## A/B runs: does this JEPA config beat vanilla?",
                  "### The protocol: which budget answers which question",
                  "### Record folders", "## Reading train_gpt_jepa.py", "## Findings", "## Repository layout"],
    "docs/settings.md": ["# Settings"],
    "docs/baseline.md": ["# The baseline: record parity and the frontier switches"],
    "docs/export_and_eval.md": ["# Export and evaluation: GPTQ, compressors, score-first TTT"],
    "docs/running.md": ["## Outputs", "## Long runs: checkpoints, resume, NaN guard", "## Byte level (byte260)",
                        "## Benchmark"],
    "docs/ab.md": ["## Fairness and statistics", "## What it writes", "## Record folders"],
    "docs/results.md": ["# Results", "## The record stack against the previous defaults, per step",
                        "## Step time of the record presets",
                        "## A/B: JEPA `next` (EMA target or stop-gradient) against vanilla, equal compute",
                        "## Step time of every path (`scripts/bench.py`)", "## Export and TTT on trained tiny weights",
                        "## Demo and artifact"],
    "docs/design.md": ["# What we write by hand and why"],
    "campaign/README.md": ["# Campaigns", "## Campaign 1: JEPA at ~1% of the backbone's gradient (stages 0-3)",
                           "### Stage 0: the budget",
                           "### Stage 1: the screen (20 JEPA arms, 2 seeds each, equal compute)",
                           "### Stage 2: confirmation (the 3 best arms and #896, 8 seeds each)",
                           "### Byte level: chunk JEPA at byte260 (#832's setting), 3 seeds",
                           "### Stage 3: robustness of the best arm (`target_frac0.25`)", "### What it means"],
}

LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")
CODE_SPAN = re.compile(r"`[^`\n]*`")


def prose_lines(text: str) -> list[str]:
    """The lines of a markdown page outside code: fenced and indented code blocks dropped, code
    spans blanked (a link's text may hold a code span; a code span never holds a link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith(("    ", "\t")):
            continue
        lines.append(CODE_SPAN.sub("code", line))
    return lines


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation other than '-' and '_'
    dropped, spaces made '-', a repeated anchor suffixed -1, -2, ..."""
    anchors: set[str] = set()
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6} (.+?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def broken_links(page: Path) -> list[str]:
    """Every relative link of the page whose file (or anchor in a markdown file) does not exist."""
    broken = []
    text = page.read_text(encoding="utf-8")
    for line in prose_lines(text):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            if not resolved.exists():
                broken.append(f"{target}: no {resolved}")
            elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved.read_text("utf-8")):
                where = os.path.relpath(resolved, page.parent)
                broken.append(f"{target}: no heading with anchor #{anchor} in {where}")
    return broken


def test_settings_table_matches_the_trainer():
    text = SETTINGS.read_text(encoding="utf-8")
    assert env_table.BEGIN_MARKER in text and env_table.END_MARKER in text, "docs/settings.md lacks the markers"
    inside = text.split(env_table.BEGIN_MARKER, 1)[1].split(env_table.END_MARKER, 1)[0].strip()
    assert inside == env_table.render_table(), "run: python3 scripts/env_table.py --write"


def test_the_readme_points_to_the_settings_instead_of_holding_them():
    readme = README.read_text(encoding="utf-8")
    assert env_table.BEGIN_MARKER not in readme and "| `JEPA_WEIGHT` |" not in readme
    assert "(docs/settings.md)" in readme


def test_every_setting_has_a_meaning_in_the_table():
    rows = [line for line in env_table.render_table().splitlines() if line.startswith("| `")]
    assert rows and all(line.rstrip(" |").split("|")[-1].strip() for line in rows)


def test_quickstart_names_the_make_targets_that_exist():
    readme = README.read_text(encoding="utf-8")
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test", "install"):
        assert f"make {target}" in readme and f"\n{target}:" in makefile
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_readme_is_short_and_names_the_workflows():
    readme = README.read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    for command in ("make demo", "make test", "torchrun --standalone --nproc_per_node=8 train_gpt_jepa.py",
                    "python3 train_gpt_jepa.py", "torchrun --nnodes=N", "scripts/ab.py", "scripts/make_record.py",
                    "scripts/check_record.py"):
        assert command in readme, command


def test_the_first_screen_leads_to_the_quickstart_the_reading_guide_and_the_findings():
    first_screen = "\n".join(README.read_text(encoding="utf-8").splitlines()[:20])
    for anchor in ("#quickstart", "#reading-train_gpt_jepapy", "#findings"):
        assert f"]({anchor})" in first_screen, anchor


@pytest.mark.parametrize("page", sorted(SECTIONS))
def test_each_part_of_the_documentation_is_where_the_readme_says(page: str):
    lines = set((REPO_ROOT / page).read_text(encoding="utf-8").splitlines())
    missing = [heading for heading in SECTIONS[page] if heading not in lines]
    assert not missing, f"{page} lacks {missing}"


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(page: Path):
    assert page.is_file()
    assert not broken_links(page)


def test_the_link_check_finds_a_broken_file_and_a_broken_anchor(tmp_path: Path):
    (tmp_path / "other.md").write_text("# A heading: with punctuation\n\n## Twice\n\n## Twice\n")
    (tmp_path / "page.md").write_text(
        "# Page\n\n[ok](other.md#a-heading-with-punctuation) [ok](other.md#twice-1) [ok](#page)\n"
        "[`code` text](missing.md) [x](other.md#no-such-heading) ![img](missing.png) [web](https://example.com)\n"
        "\n    [in a code block](ignored.md)\n\n`[in a code span](ignored.md)`\n")
    assert broken_links(tmp_path / "page.md") == [
        f"missing.md: no {tmp_path / 'missing.md'}",
        "other.md#no-such-heading: no heading with anchor #no-such-heading in other.md",
        f"missing.png: no {tmp_path / 'missing.png'}"]


def git_lines(*arguments: str) -> list[str]:
    result = subprocess.run(["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.skip(f"git {' '.join(arguments)} failed: {result.stderr.strip()[:200]}")
    return [line for line in result.stdout.splitlines() if line]


@pytest.fixture
def git_checkout() -> None:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")


def test_the_top_level_holds_only_the_layout(git_checkout):
    # Tracked files still present (a file moved away but not yet committed no longer counts).
    present = set(git_lines("ls-files")) - set(git_lines("ls-files", "--deleted"))
    top_level = {path.split("/", 1)[0] for path in present}
    assert top_level <= TOP_LEVEL, f"tracked at the top level but not in the layout: {sorted(top_level - TOP_LEVEL)}"
    assert all((REPO_ROOT / entry).exists() for entry in TOP_LEVEL), sorted(
        entry for entry in TOP_LEVEL if not (REPO_ROOT / entry).exists())


def test_no_committed_result_under_campaign_is_git_ignored(git_checkout):
    # campaign/**/logs/*.txt is ignored for the campaigns' trainer logs; the earlier A/Bs' and
    # benchmarks' logs were committed and must stay addable where they now live.
    ignored = git_lines("ls-files", "--others", "--ignored", "--exclude-standard", "--",
                        "campaign/ab", "campaign/bench")
    assert not [path for path in ignored if path.endswith((".txt", ".json", ".log", ".md", ".png"))]
    assert not git_lines("ls-files", "--cached", "--ignored", "--exclude-standard", "--",
                         "campaign/ab", "campaign/bench")


def test_the_reading_guide_names_the_trainers_banners_in_their_order():
    """The reading guide lists the section banners as the trainer has them, in pipeline order, and
    every function or class it sends a reader to exists."""
    trainer = (REPO_ROOT / "train_gpt_jepa.py").read_text()
    banners = re.findall(r"^# =+\n# ([A-Z][A-Z -]+?)(?::|\n)", trainer, flags=re.MULTILINE)
    guide = README.read_text().split("## Reading train_gpt_jepa.py", 1)[1].split("\n## ", 1)[0]
    listed = re.search(r"banners \(`# ====` lines\) split it into parts that can be read alone:\n(.*?)\. A first",
                       guide, flags=re.DOTALL)
    assert listed, "the reading guide no longer lists the banners"
    assert [name.strip() for name in re.findall(r"`([A-Z][A-Z -]+)`", listed.group(1))] == banners
    for name in re.findall(r"`(?:[A-Za-z]+\.)?([a-z_]+|[A-Z][A-Za-z]+)`", guide):
        if name.isupper():
            continue
        assert re.search(rf"^\s*(?:def|class) {name}\b|^{name} = ", trainer, flags=re.MULTILINE), name

"""The README documents what the code does: its environment-variable table is the one
scripts/env_table.py renders from the trainer, and its quickstart names the real commands."""

from __future__ import annotations

import sys

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import env_table  # noqa: E402


def test_readme_environment_table_matches_the_trainer():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    inside = readme.split(env_table.BEGIN_MARKER, 1)[1].split(env_table.END_MARKER, 1)[0].strip()
    assert inside == env_table.render_table(), "run: python3 scripts/env_table.py --write"


def test_every_setting_has_a_meaning_in_the_table():
    rows = [line for line in env_table.render_table().splitlines() if line.startswith("| `")]
    assert rows and all(line.rstrip(" |").split("|")[-1].strip() for line in rows)


def test_quickstart_names_the_make_targets_that_exist():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test", "install"):
        assert f"make {target}" in readme and f"\n{target}:" in makefile
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")

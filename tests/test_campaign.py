"""The research campaigns' committed runs recompute their committed tables: for every stage folder
under campaign/, `scripts/ab.py --no-run` (through campaign/run_campaign.sh or run_active.sh,
tables written to a temporary folder) reads the committed summaries and prints the same per-arm figures, leaderboard
and verdicts as the committed table.md."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, environment_without_trainer_settings

CAMPAIGN = REPO_ROOT / "campaign"
# (script, stage name) -> the folders (relative to campaign/) whose tables the stage writes
STAGES = {
    ("run_campaign.sh", "stage1"): ["stage1_screen"],
    ("run_campaign.sh", "stage2"): ["stage2_confirm"],
    ("run_campaign.sh", "stage3"): ["stage3_robustness/budget3x", "stage3_robustness/nodejs", "stage3_robustness/steps"],
    ("run_campaign.sh", "byte"): ["byte_level"],
    ("run_active.sh", "dose"): ["active/dose"],
    ("run_active.sh", "pull"): ["active/pull"],
    ("run_active.sh", "compute"): ["active/compute"],
    ("run_active.sh", "tune"): ["active/limited_tune"],
    ("run_active.sh", "limited"): ["active/limited", "active/limited_tuned"],
    ("run_active.sh", "long"): ["active/long"],
}
# Lines that name when and from where the table was written, and the runs' outcome column
# (ran there, reused here): everything else must be equal.
VOLATILE_PREFIXES = ("- date:", "- command:")


def comparable(table: str) -> list[str]:
    """The table up to its list of runs, without the lines that say when and how it was made."""
    head = table.split("\n## Runs", 1)[0]
    return [line for line in head.splitlines() if not line.startswith(VOLATILE_PREFIXES)]


@pytest.mark.parametrize("script, stage", sorted(STAGES), ids=lambda value: value.removesuffix(".sh"))
def test_committed_campaign_tables_recompute_from_the_committed_summaries(script: str, stage: str, tmp_path: Path):
    folders = [CAMPAIGN / folder for folder in STAGES[script, stage]]
    if not all((folder / "table.md").is_file() for folder in folders):
        pytest.skip(f"campaign stage {stage} not committed")
    for folder in folders:
        copy = tmp_path / folder.relative_to(CAMPAIGN)
        copy.mkdir(parents=True)
        if (folder / "step_times.json").is_file():
            shutil.copy(folder / "step_times.json", copy / "step_times.json")
    environment = environment_without_trainer_settings()
    environment["CAMPAIGN_OUT"] = str(tmp_path)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run(["bash", str(CAMPAIGN / script), stage, "--no-run"], cwd=REPO_ROOT,
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for folder in folders:
        committed = (folder / "table.md").read_text(encoding="utf-8")
        recomputed = (tmp_path / folder.relative_to(CAMPAIGN) / "table.md").read_text(encoding="utf-8")
        assert comparable(recomputed) == comparable(committed), folder

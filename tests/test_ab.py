"""The A/B harness, scripts/ab.py: Student's t and Welch's test against hand-computed and table
values, the trainer's summaries read back, and a tiny A/B (2 arms x 2 seeds, 4 steps each) run
end to end on the CPU: table, curves, reuse and the plan that scripts/make_record.py reads."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import AB_ARMS, AB_COMMON, REPO_ROOT, run_ab, trainer_env

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import ab  # noqa: E402

import ab_stats  # noqa: E402


def leaderboard_row(table: str, arm: str) -> list[str]:
    """The cells of an arm's row in the leaderboard: rank, arm, pairs, paired difference, CI,
    one-sided p, Holm p, Welch, pre-quant difference, MDE, seeds for 0.005, verdict."""
    section = table.split("## Leaderboard against the baseline", 1)[1].split("## Runs", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith("| ") and f" | {arm} | " in line)
    return [cell.strip() for cell in row.strip("|").split("|")]


def fake_plan(tmp_path: Path, scores: dict[str, dict[int, float]], baseline: str) -> ab.Plan:
    """A plan whose runs are already completed with the given roundtrip scores (no training)."""
    arms = [ab.Arm(name, {"JEPA_WEIGHT": "0" if name == baseline else str(0.1 * (index + 1))})
            for index, name in enumerate(scores)]
    plan = ab.Plan(arms, baseline, sorted({seed for values in scores.values() for seed in values}), "steps",
                   {"ITERATIONS": "10"}, {}, {}, [sys.executable], tmp_path, tmp_path)
    for arm, values in scores.items():
        for seed, value in values.items():
            summary = {"roundtrip_val_bpb": value, "val_bpb": value - 0.001, "steps": 10, "dataset": "d",
                       "device": "cpu", "code_sha256": "0" * 64, "world_size": 1}
            plan.runs.append(ab.Run(arm, seed, f"t_{arm}_s{seed}", {}, {}, summary, "ran"))
    return plan


# ---------------------------------------------------------------------------
# Analysis: paired differences, Holm across arms, the leaderboard's order
# ---------------------------------------------------------------------------


def test_analysis_pairs_by_seed_corrects_with_holm_and_sorts_the_leaderboard(tmp_path):
    base = {1: 2.00, 2: 2.10, 3: 1.95, 4: 2.05}
    scores = {
        "worse": {seed: value + 0.010 + 0.001 * seed for seed, value in base.items()},
        "better": {seed: value - 0.020 + 0.002 * (seed % 2) for seed, value in base.items()},
        "short": {1: base[1] - 0.5},  # one seed: no p-value, no CI, ranked by its difference
        "vanilla": base,
    }
    plan = fake_plan(tmp_path, scores, "vanilla")
    comparisons = ab.analyse(plan)
    assert [c.arm for c in comparisons] == ["short", "better", "worse"]
    better = next(c for c in comparisons if c.arm == "better")
    # Paired by seed: differences -0.018, -0.020, -0.018, -0.020 (the seed effect cancels).
    assert better.paired.kind == "paired" and better.paired.n == 4
    assert better.paired.difference == pytest.approx(-0.019)
    assert better.seed_differences == pytest.approx({1: -0.018, 2: -0.020, 3: -0.018, 4: -0.020})
    p_values = [c.paired.p_one_sided for c in comparisons]
    assert p_values[0] is None and "1 pair" in comparisons[0].paired.reason
    assert [c.p_holm for c in comparisons] == ab_stats.holm_adjust(p_values)
    assert better.p_holm == pytest.approx(2 * better.paired.p_one_sided)  # the smaller of two p's, times 2
    assert better.significant and better.verdict().startswith("beats")
    assert next(c for c in comparisons if c.arm == "worse").verdict().startswith("loses")
    assert better.mde == pytest.approx(ab_stats.minimum_detectable_difference(better.paired.std_of_differences, 4))

    effects = ab.effects_record(plan, comparisons)
    assert [arm["arm"] for arm in effects["arms"]] == ["short", "better", "worse"]
    short = effects["arms"][0]
    assert short["n_pairs"] == 1 and short["ci_low"] is None and short["p_holm"] is None
    assert effects["arms"][1]["seed_differences"] == pytest.approx({"1": -0.018, "2": -0.020, "3": -0.018,
                                                                     "4": -0.020})
    assert effects["bar"] == -0.005 and effects["baseline"] == "vanilla"


# ---------------------------------------------------------------------------
# Command line and plan (no runs)
# ---------------------------------------------------------------------------


def test_arm_syntax():
    arm = ab.parse_arm("span:JEPA_MODE=span JEPA_WEIGHT=0.2")
    assert (arm.name, arm.settings) == ("span", {"JEPA_MODE": "span", "JEPA_WEIGHT": "0.2"})
    assert ab.parse_arm("jepa").settings == {}
    for bad in ("two words:JEPA_WEIGHT=0", "x:jepa_weight=0", "x:JEPA_WEIGHT", "x:SEED=3", "x:ITERATIONS=9",
                "x:MAX_WALLCLOCK_SECONDS=60", ":JEPA_WEIGHT=0", "a/b:JEPA_WEIGHT=0"):
        with pytest.raises(ab.UserError):
            ab.parse_arm(bad)


def test_grid_expands_to_the_cartesian_arms_named_from_their_settings(tmp_path):
    arms = ab.parse_grid("JEPA_WEIGHT=0.001,0.01,0.1 TARGET_EMA_DECAY=0,0.99")
    assert [arm.name for arm in arms] == [
        "jepa_weight=0.001+target_ema_decay=0", "jepa_weight=0.001+target_ema_decay=0.99",
        "jepa_weight=0.01+target_ema_decay=0", "jepa_weight=0.01+target_ema_decay=0.99",
        "jepa_weight=0.1+target_ema_decay=0", "jepa_weight=0.1+target_ema_decay=0.99"]
    assert arms[3].settings == {"JEPA_WEIGHT": "0.01", "TARGET_EMA_DECAY": "0.99"}
    # '|' separates values that hold commas themselves.
    offsets = ab.parse_grid("JEPA_OFFSETS=1|1,2,4,8")
    assert [arm.settings for arm in offsets] == [{"JEPA_OFFSETS": "1"}, {"JEPA_OFFSETS": "1,2,4,8"}]
    for bad in ("JEPA_WEIGHT=0.1,0.1", "JEPA_WEIGHT=0.1,", "ITERATIONS=5,6", "", "JEPA_MODE=a/b,c"):
        with pytest.raises(ab.UserError):
            ab.parse_grid(bad)

    # Beside explicit arms; a vanilla baseline is added when no arm has JEPA_WEIGHT=0.
    environ = {"PRESET": "tiny", "PATH": os.environ.get("PATH", "")}
    argv = ["--arm", "span:JEPA_MODE=span", "--grid", "JEPA_WEIGHT=0.01,0.1", "--grid", "JEPA_LOSS=cosine",
            "--budget", "steps", "--env", "ITERATIONS=5", "--seeds", "1,2", "--out", str(tmp_path / "sweep")]
    plan = ab.build_plan(ab.parse_args(argv), environ)
    assert [arm.name for arm in plan.arms] == ["span", "jepa_weight=0.01", "jepa_weight=0.1", "jepa_loss=cosine",
                                               "vanilla"]
    assert plan.baseline == "vanilla" and plan.arm_settings("vanilla") == {"JEPA_WEIGHT": "0"}
    assert len(plan.runs) == 10 and plan.runs[1].run_id == "sweep_jepa_weight=0.01_s1"
    assert plan.runs[1].config["jepa_weight"] == 0.01 and plan.runs[3].config["jepa_loss"] == "cosine"
    # A grid that holds the control itself needs no added arm.
    plan = ab.build_plan(ab.parse_args(["--grid", "JEPA_WEIGHT=0,0.1", "--budget", "steps", "--env", "ITERATIONS=5",
                                        "--seeds", "1", "--out", str(tmp_path / "g")]), environ)
    assert [arm.name for arm in plan.arms] == ["jepa_weight=0", "jepa_weight=0.1"]
    assert plan.baseline == "jepa_weight=0"


class StepTimer:
    """Injected step times (ms per arm): the compute budget without timing anything."""

    def __init__(self, step_ms: dict[str, float]):
        self.step_ms, self.calls = step_ms, []

    def __call__(self, plan: ab.Plan, settings_by_arm: dict[str, dict[str, str]]) -> tuple[dict[str, float], str]:
        self.calls.append(sorted(settings_by_arm))
        baseline = self.step_ms[plan.baseline]
        return ({arm: (self.step_ms[arm], self.step_ms[arm] / baseline, [self.step_ms[arm] / baseline] * 3)
                 for arm in settings_by_arm}, "test device")


def test_compute_budget_gives_slower_arms_proportionally_fewer_iterations(tmp_path):
    environ = {"PRESET": "tiny", "PATH": os.environ.get("PATH", "")}
    argv = ["--arm", "slow:TARGET_EMA_DECAY=0.99", "--arm", "fast:JEPA_TARGET_FRACTION=0.5", "--arm",
            "vanilla:JEPA_WEIGHT=0", "--env", "ITERATIONS=200", "--seeds", "1,2", "--out", str(tmp_path / "c")]
    timer = StepTimer({"vanilla": 100.0, "slow": 125.0, "fast": 80.0})
    plan = ab.build_plan(ab.parse_args(argv), environ, step_timer=timer)
    assert plan.budget == "compute" and timer.calls == [["fast", "slow", "vanilla"]]
    expected = {"vanilla": 200, "slow": 160, "fast": 250}  # round(200 * 100 / t_arm)
    for run in plan.runs:
        assert run.config["iterations"] == expected[run.arm] and run.settings["ITERATIONS"] == str(expected[run.arm])
        assert run.config["max_wallclock_seconds"] == 0 and run.settings["FINAL_EMA"] == "0"
    assert plan.step_times["slow"]["ratio"] == pytest.approx(1.25) and plan.iterations("fast") == 250
    assert ab.compute_iterations(1000, {"a": 1.3, "b": 0.999, "c": 1e9}) == {"a": 769, "b": 1001, "c": 1}

    # The measurement is kept: a rerun (or more seeds) measures nothing and keeps every ITERATIONS.
    stored = json.loads((tmp_path / "c" / "step_times.json").read_text())
    assert stored["arms"]["slow"]["step_ms"] == 125.0 and stored["baseline_iterations"] == 200
    never = StepTimer({})
    again = ab.build_plan(ab.parse_args(argv[:-4] + ["--seeds", "1,2,3", "--out", str(tmp_path / "c")]), environ,
                          step_timer=never)
    assert never.calls == [] and {run.arm: run.config["iterations"] for run in again.runs} == expected
    # A new arm is measured beside the baseline only; the others keep their ratios.
    timer = StepTimer({"vanilla": 50.0, "span": 100.0})
    more = ab.build_plan(ab.parse_args(["--arm", "span:JEPA_MODE=span"] + argv), environ, step_timer=timer)
    assert timer.calls == [["span", "vanilla"]] and more.iterations("span") == 100 and more.iterations("slow") == 160
    # A subset of the arms (a table of two, say) keeps the others' measurements for later.
    subset = ab.build_plan(ab.parse_args(["--arm", "slow:TARGET_EMA_DECAY=0.99", "--arm", "vanilla:JEPA_WEIGHT=0",
                                          "--env", "ITERATIONS=200", "--out", str(tmp_path / "c")]), environ,
                           step_timer=never)
    assert subset.iterations("slow") == 160 and never.calls == []
    assert sorted(json.loads((tmp_path / "c" / "step_times.json").read_text())["arms"]) == [
        "fast", "slow", "span", "vanilla"]
    # A changed baseline (its settings are part of every ratio) remeasures every arm.
    timer = StepTimer({"vanilla": 100.0, "slow": 200.0, "fast": 100.0})
    changed = [arg.replace("ITERATIONS=200", "ITERATIONS=200 MATRIX_LR=0.03") for arg in argv]
    plan = ab.build_plan(ab.parse_args(changed), environ, step_timer=timer)
    assert timer.calls == [["fast", "slow", "vanilla"]] and plan.iterations("slow") == 100
    # Another baseline (which arm it is) makes every stored ratio meaningless: all are measured again.
    timer = StepTimer({"vanilla": 100.0, "slow": 200.0, "fast": 100.0})
    rebased = ab.build_plan(ab.parse_args(changed + ["--baseline", "slow"]), environ, step_timer=timer)
    assert timer.calls == [["fast", "slow", "vanilla"]] and rebased.iterations("slow") == 200
    assert rebased.iterations("vanilla") == 400
    # So does another trainer before new runs (--no-run reads what the finished runs used).
    stored = json.loads((tmp_path / "c" / "step_times.json").read_text())
    assert stored["baseline"] == "slow" and stored["trainer_sha256"] == ab.trainer_sha256()
    stored["trainer_sha256"] = "0" * 64
    (tmp_path / "c" / "step_times.json").write_text(json.dumps(stored))
    no_run = ab.build_plan(ab.parse_args(changed + ["--baseline", "slow", "--no-run"]), environ, step_timer=never)
    assert never.calls == [] and no_run.iterations("vanilla") == 400
    timer = StepTimer({"vanilla": 100.0, "slow": 100.0, "fast": 100.0})
    ab.build_plan(ab.parse_args(changed + ["--baseline", "slow"]), environ, step_timer=timer)
    assert timer.calls == [["fast", "slow", "vanilla"]]

    # FINAL_EMA=-1 would switch on at ITERATIONS >= 1000 for the baseline only: every arm gets the baseline's.
    argv = ["--arm", "slow:TARGET_EMA_DECAY=0.99", "--arm", "vanilla:JEPA_WEIGHT=0", "--env",
            "ITERATIONS=1000 FINAL_EMA=-1", "--seeds", "1", "--out", str(tmp_path / "e")]
    plan = ab.build_plan(ab.parse_args(argv), environ, step_timer=StepTimer({"vanilla": 100.0, "slow": 125.0}))
    assert {run.arm: run.config["iterations"] for run in plan.runs} == {"slow": 800, "vanilla": 1000}
    assert plan.common["FINAL_EMA"] == "1" and all(run.config["final_ema"] == 1 for run in plan.runs)


def test_plan_budget_seeds_and_baseline(tmp_path):
    environ = {"PRESET": "tiny", "PATH": os.environ.get("PATH", "")}
    plan = ab.build_plan(ab.parse_args(["--seeds", "3,7", "--budget", "wallclock", "--env", "MAX_WALLCLOCK_SECONDS=30",
                                        "--out", str(tmp_path / "my run")]), environ)
    assert [arm.name for arm in plan.arms] == ["jepa", "vanilla"] and plan.baseline == "vanilla"
    assert [(run.arm, run.seed) for run in plan.runs] == [("jepa", 3), ("vanilla", 3), ("jepa", 7), ("vanilla", 7)]
    assert plan.runs[0].run_id == "my_run_jepa_s3"
    for run in plan.runs:  # equal budget: the clock binds, the step count never does
        assert run.settings["MAX_WALLCLOCK_SECONDS"] == "30" and run.settings["ITERATIONS"] == "1000000"
        assert run.settings["PRESET"] == "tiny" and run.settings["SEED"] == str(run.seed)
        assert run.config["jepa_weight"] == (0.0 if run.arm == "vanilla" else 0.1)
    assert len({run.settings["ARTIFACT_PATH"] for run in plan.runs}) == 4

    plan = ab.build_plan(ab.parse_args(["--arm", "a:JEPA_WEIGHT=0.3", "--arm", "b:JEPA_WEIGHT=0.2", "--arm",
                                        "c:JEPA_MODE=span", "--budget", "steps", "--env", "ITERATIONS=50",
                                        "--seeds", "1", "--out", str(tmp_path), "--tag", "t"]), environ)
    assert plan.baseline == "c"  # no arm with JEPA_WEIGHT=0: the last one
    assert all(run.settings["MAX_WALLCLOCK_SECONDS"] == "0" and run.config["iterations"] == 50 for run in plan.runs)


def test_out_defaults_to_campaign_ab_tag_and_needs_one_of_out_and_tag(tmp_path):
    environ = {"PRESET": "tiny", "PATH": os.environ.get("PATH", "")}
    argv = ["--budget", "steps", "--env", "ITERATIONS=5", "--seeds", "1"]
    plan = ab.build_plan(ab.parse_args(argv + ["--tag", "default_out_probe"]), environ)
    assert plan.out_dir == REPO_ROOT / "campaign" / "ab" / "default_out_probe"
    assert plan.runs[0].run_id == "default_out_probe_jepa_s1"
    artifact = plan.out_dir / "artifacts" / "default_out_probe_jepa_s1.int6.ptz"
    assert plan.runs[0].settings["ARTIFACT_PATH"] == str(artifact)
    assert not plan.out_dir.exists()  # planning writes nothing under --budget steps
    # --out alone names the tag after its folder; --out and --tag together keep both.
    assert ab.build_plan(ab.parse_args(argv + ["--out", str(tmp_path / "my run")]), environ).runs[0].run_id == \
        "my_run_jepa_s1"
    both = ab.build_plan(ab.parse_args(argv + ["--out", str(tmp_path / "x"), "--tag", "t"]), environ)
    assert both.out_dir == tmp_path / "x" and both.runs[0].run_id == "t_jepa_s1"
    # Neither: one line, exit status 2, nothing written.
    code, stdout, stderr = run_ab(argv, {"PRESET": "tiny"})
    assert code == 2 and stderr == "error: give --out FOLDER or --tag NAME (the outputs then go to campaign/ab/NAME)\n"
    assert "run 1/" not in stdout


def test_markdown_helpers_spell_tables_and_lists():
    import ab_report

    table = ab_report.markdown_table(["a", "b"], [["1", "2"], ["3", "—"]])
    assert table == "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | — |"
    assert ab_report.bullet_list(["one", "two"]) == "- one\n- two"
    assert ab_report.markdown_document(["# T", "- x", "| a |\n|---|"]) == "# T\n\n- x\n\n| a |\n|---|\n"


@pytest.mark.parametrize("argv, message", [
    (["--budget", "steps"], "--budget steps needs ITERATIONS"),
    ([], "--budget compute needs ITERATIONS"),
    (["--budget", "wallclock"], "--budget wallclock needs MAX_WALLCLOCK_SECONDS > 0"),
    (["--env", "ITERATIONS=9", "--arm", "a:JEPA_WIEGHT=0", "--arm", "b"], "did you mean JEPA_WEIGHT"),
    (["--env", "ITERATIONS=9", "--arm", "a:JEPA_WEIGHT=0.1", "--arm", "b"], "same configuration"),
    (["--env", "ITERATIONS=9", "--grid", "JEPA_WEIGHT=0.1,0.2", "--arm", "jepa_weight=0.1:JEPA_MODE=span"],
     "same name"),
    (["--env", "ITERATIONS=9", "--grid", "JEPA_WEIGHT=0.1,0.1"], "distinct"),
    (["--env", "ITERATIONS=9", "--arm", "a"], "at least two"),
    (["--env", "ITERATIONS=9", "--seeds", "1,x"], "--seeds"),
    (["--env", "ITERATIONS=9 SEED=4"], "--env sets SEED"),
    (["--budget", "steps", "--env", "ITERATIONS=5 MAX_WALLCLOCK_SECONDS=60"], "without a wall-clock cap"),
    (["--env", "ITERATIONS=5 MAX_WALLCLOCK_SECONDS=60"], "without a wall-clock cap"),
    (["--env", "ITERATIONS=5", "--no-run"], "no step times"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, argv, message):
    code, _, stderr = run_ab(argv + ["--out", str(tmp_path / "out")], {"PRESET": "tiny"})
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# A tiny A/B end to end: 2 arms x 2 seeds, 4 steps each
# ---------------------------------------------------------------------------

ARMS, COMMON = AB_ARMS, AB_COMMON  # the session's tiny A/B (conftest.ab_run): 2 arms x 2 seeds, 4 steps


def roundtrip_values(ab_run: dict, arm: str) -> list[float]:
    return [ab_run["summaries"][f"e2e_{arm}_s{seed}"]["roundtrip_val_bpb"] for seed in (1, 2)]


def test_end_to_end_table_and_curves(ab_run):
    assert ab_run["stdout"].count("done in") == 4 and "reused" not in ab_run["stdout"]
    assert sorted(ab_run["summaries"]) == ["e2e_jepa_s1", "e2e_jepa_s2", "e2e_vanilla_s1", "e2e_vanilla_s2"]
    table = (ab_run["out"] / "table.md").read_text()
    assert table in ab_run["stdout"]  # printed as written
    assert "statistics (scipy): paired t test on per-seed differences" in table
    for arm in ("jepa", "vanilla"):
        assert re.search(rf"^\| {arm} \| 2 \| \d\.\d{{4}} ± \d\.\d{{4}} \|", table, re.MULTILINE), table
    # The comparison is the paired test by seed on the summaries' roundtrip scores, as printed,
    # with Welch's test beside it.
    jepa, vanilla = roundtrip_values(ab_run, "jepa"), roundtrip_values(ab_run, "vanilla")
    expected = ab_stats.paired_test(dict(zip((1, 2), jepa)), dict(zip((1, 2), vanilla)))
    welch = ab_stats.welch_test(jepa, vanilla)
    cells = leaderboard_row(table, "jepa")
    assert cells[:3] == ["1", "jepa", "2"]
    assert cells[3] == f"{expected.difference:+.4f}" and cells[5] == f"{expected.p_one_sided:.3g}"
    assert cells[4] == f"[{expected.ci_low:+.4f}, {expected.ci_high:+.4f}]"
    assert cells[7] == f"{welch.difference:+.4f} ({welch.p_one_sided:.3g})"
    assert "vanilla" in table.split("## Leaderboard against the baseline", 1)[1].splitlines()[0]
    assert "[effects.png](effects.png)" in table and "[curves.png](curves.png)" in table

    # effects.json holds exactly the table's paired differences and CIs.
    effects = json.loads((ab_run["out"] / "effects.json").read_text())
    (arm,) = effects["arms"]
    assert arm["arm"] == "jepa" and arm["n_pairs"] == 2 and effects["budget"] == "steps"
    assert f"{arm['difference']:+.4f}" == cells[3] and f"[{arm['ci_low']:+.4f}, {arm['ci_high']:+.4f}]" == cells[4]
    assert arm["seed_differences"] == pytest.approx({"1": jepa[0] - vanilla[0], "2": jepa[1] - vanilla[1]})
    assert arm["step_time_ratio"] is None and arm["iterations"] is None  # --budget steps: nothing measured

    for name in ("effects.png", "curves.png"):
        png = (ab_run["out"] / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
        width, height = struct.unpack(">II", png[16:24])
        assert width >= 800 and height >= 300 and len(png) > 20_000, name  # drawn panels, not an empty canvas


def test_summaries_are_read_as_the_trainer_wrote_them(ab_run):
    table = (ab_run["out"] / "table.md").read_text()
    for run_id, summary in ab_run["summaries"].items():
        arm, seed = run_id.split("_")[1], int(run_id[-1])
        assert ab.read_summary(ab_run["logs"] / f"{run_id}.json") == summary
        assert summary["status"] == "completed" and summary["steps"] == 4 and summary["config"]["seed"] == seed
        assert summary["config"]["jepa_weight"] == (0.5 if arm == "jepa" else 0.0)
        assert [point["step"] for point in summary["val_history"]] == [2, 4]
        # The full log's exact roundtrip line is the summary's score; the table shows it per run.
        log_text = (ab_run["logs"] / f"{run_id}.txt").read_text()
        assert f"{summary['roundtrip_line']} val_loss:{summary['roundtrip_val_loss']:.8f} " \
               f"val_bpb:{summary['roundtrip_val_bpb']:.8f}" in log_text
        assert f"| {run_id} | {arm} | {seed} | ran | {summary['roundtrip_val_bpb']:.4f} |" in table
        assert Path(summary["artifact_path"]) == ab_run["out"] / "artifacts" / f"{run_id}.int6.ptz"


def test_rerun_from_the_command_line_reuses_every_run(ab_run):
    before = {path.name: path.stat().st_mtime_ns for path in ab_run["logs"].iterdir()}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "ab.py"), *ab_run["argv"]],
                            env=ab_run["environ"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"^run \d/4: .* \.\.\. reused: roundtrip val_bpb", result.stdout, re.MULTILINE)) == 4
    assert "done in" not in result.stdout
    assert {path.name: path.stat().st_mtime_ns for path in ab_run["logs"].iterdir()} == before


def logs_with_a_foreign_run(ab_run: dict, folder: str, run_id: str, sha256: str) -> Path:
    """A copy of the A/B's logs in which one run's summary says another trainer produced it."""
    logs = ab_run["root"] / folder
    shutil.copytree(ab_run["logs"], logs)
    summary_file = logs / f"{run_id}.json"
    summary = json.loads(summary_file.read_text())
    summary["code_sha256"] = sha256
    summary_file.write_text(json.dumps(summary))
    return logs


def test_reuse_refuses_summaries_of_another_trainer_unless_only_reading(ab_run):
    other_logs = logs_with_a_foreign_run(ab_run, "other_trainer_logs", "e2e_jepa_s1", "f" * 64)
    argv = ARMS + COMMON + ["--env", f"LOG_DIR={other_logs}", "--seeds", "1,2", "--tag", "e2e",
                            "--out", str(ab_run["root"] / "other_trainer")]
    code, stdout, stderr = run_ab(argv, ab_run["environ"])
    assert code == 2 and "f" * 64 in stderr and "mix trainer versions" in stderr and "run 1/4" not in stdout
    code, _, stderr = run_ab(argv + ["--no-run"], ab_run["environ"])
    assert code == 0, stderr
    assert "runs from different trainer versions" in (ab_run["root"] / "other_trainer" / "table.md").read_text()


def test_reuse_refuses_summaries_of_other_settings(ab_run):
    argv = [arg.replace("ITERATIONS=4", "ITERATIONS=5") for arg in ab_run["argv"]]
    code, stdout, stderr = run_ab(argv, ab_run["environ"])
    assert code == 2 and "other settings" in stderr and "ITERATIONS: 4 there, 5 now" in stderr
    assert "run 1/4" not in stdout  # refused before anything ran


def test_single_seed_says_why_there_is_no_p_value(ab_run):
    argv = ARMS + COMMON + ["--seeds", "1", "--tag", "e2e", "--no-run", "--out", str(ab_run["root"] / "single")]
    code, _, stderr = run_ab(argv, ab_run["environ"])
    assert code == 0, stderr
    table = (ab_run["root"] / "single" / "table.md").read_text()
    cells = leaderboard_row(table, "jepa")
    assert cells[4] == "—" and cells[5] == "—" and cells[6] == "—" and "1 pair" in cells[11]
    jepa, vanilla = (ab_run["summaries"][f"e2e_{arm}_s1"]["roundtrip_val_bpb"] for arm in ("jepa", "vanilla"))
    assert cells[3] == f"{jepa - vanilla:+.4f}"
    effects = json.loads((ab_run["root"] / "single" / "effects.json").read_text())
    assert effects["arms"][0]["n_pairs"] == 1 and effects["arms"][0]["ci_low"] is None


def test_no_run_names_the_missing_summaries(ab_run):
    argv = ARMS + COMMON + ["--seeds", "1,3", "--tag", "e2e", "--no-run", "--out", str(ab_run["root"] / "missing")]
    code, _, stderr = run_ab(argv, ab_run["environ"])
    assert code == 2 and "e2e_jepa_s3.json (missing)" in stderr and "e2e_vanilla_s3.json (missing)" in stderr
    assert "e2e_jepa_s1" not in stderr


def test_a_failed_run_stops_with_its_log_tail(ab_run):
    # MODEL_DIM=102 parses, so the harness launches it; the trainer rejects it (102 % NUM_HEADS=4 != 0).
    arms = ["--arm", "broken:MODEL_DIM=102", "--arm", "vanilla:JEPA_WEIGHT=0"]
    argv = arms + COMMON + ["--seeds", "1", "--tag", "e2e", "--out", str(ab_run["root"] / "failed")]
    code, stdout, stderr = run_ab(argv, ab_run["environ"])
    assert code == 1 and "run 2/2" not in stdout
    assert "e2e_broken_s1" in stderr and "exit status 2" in stderr and "error: MODEL_DIM" in stderr
    # --keep-going: the other arm still counts (its seed-1 run is reused) and the table says what failed.
    code, stdout, stderr = run_ab(argv + ["--keep-going"], ab_run["environ"])
    assert code == 1 and "run 2/2: vanilla seed 1 (e2e_vanilla_s1) ... reused" in stdout
    table = (ab_run["root"] / "failed" / "table.md").read_text()
    assert "| broken | 0 |" in table and "| vanilla | 1 |" in table
    assert "| e2e_broken_s1 | broken | 1 | failed | — |" in table


def test_compute_budget_end_to_end_measures_in_one_process_and_records_the_ratios(tiny_dataset, tmp_path):
    # The real measurement (scripts/bench.py in a subprocess, one step per arm) and the runs it sizes.
    environ = trainer_env(tiny_dataset, LOG_DIR=tmp_path / "logs")
    argv = ["--arm", "ema:TARGET_EMA_DECAY=0.9", "--arm", "vanilla:JEPA_WEIGHT=0", "--env", "ITERATIONS=4",
            "--seeds", "1", "--calibration-steps", "1", "--calibration-rounds", "1", "--calibration-warmup", "1",
            "--out", str(tmp_path / "compute")]
    code, stdout, stderr = run_ab(argv, environ)
    assert code == 0, stdout + stderr
    stored = json.loads((tmp_path / "compute" / "step_times.json").read_text())
    ratio = stored["arms"]["ema"]["ratio"]
    assert stored["arms"]["vanilla"]["ratio"] == 1.0 and ratio > 0 and "cpu" in stored["arms"]["ema"]["device"]
    expected = {"ema": max(1, round(4 / ratio)), "vanilla": 4}
    for arm in ("ema", "vanilla"):
        summary = json.loads((tmp_path / "logs" / f"compute_{arm}_s1.json").read_text())
        assert summary["steps"] == expected[arm] and summary["config"]["max_wallclock_seconds"] == 0
        assert summary["ab"] == {"tag": "compute", "arm": arm, "baseline": "vanilla", "budget": "compute",
                                 "iterations": expected[arm], "step_time_ratio": stored["arms"][arm]["ratio"]}
    table = (tmp_path / "compute" / "table.md").read_text()
    assert "## Step times (equal compute)" in table and "| ema | " in table
    step_ms = stored["arms"]["ema"]["step_ms"]
    assert f"| ema | {step_ms:.1f} | {ratio:.3f} | {ratio:.3f} - {ratio:.3f} | {expected['ema']} |" in table
    effects = json.loads((tmp_path / "compute" / "effects.json").read_text())
    assert effects["arms"][0]["step_time_ratio"] == ratio and effects["arms"][0]["iterations"] == expected["ema"]
    # plan.json carries what make_record.py bakes into a record: the arm's own ITERATIONS.
    plan, _ = ab.load_plan(tmp_path / "compute")
    assert plan.step_times["ema"]["ratio"] == ratio
    assert {run.arm: run.settings["ITERATIONS"] for run in plan.runs} == {arm: str(n) for arm, n in expected.items()}


def test_compute_budget_times_one_rank_of_a_multi_process_run(tmp_path):
    assert ab.launcher_world_size(["python3"]) == 1
    assert ab.launcher_world_size(["torchrun", "--standalone", "--nproc_per_node=8"]) == 8
    assert ab.launcher_world_size(["torchrun", "--nnodes", "2", "--nproc-per-node", "4"]) == 8
    environ = {"PRESET": "tiny", "PATH": os.environ.get("PATH", "")}
    timer = StepTimer({"vanilla": 100.0, "jepa": 130.0})
    argv = ["--env", "ITERATIONS=100", "--seeds", "1", "--launcher", "torchrun --standalone --nproc_per_node=4",
            "--out", str(tmp_path / "ddp")]
    captured: list[dict[str, dict[str, str]]] = []
    plan = ab.build_plan(ab.parse_args(argv), environ,
                         step_timer=lambda plan, settings: captured.append(settings) or timer(plan, settings))
    # The tiny preset's 8,192 tokens per step over 4 ranks x 2 micro-steps: one rank's share, as one process.
    assert captured[0]["jepa"]["TRAIN_BATCH_TOKENS"] == "2048" and captured[0]["jepa"]["GRAD_ACCUM_STEPS"] == "2"
    assert "GRAD_ACCUM_STEPS" not in plan.runs[0].settings  # the runs themselves are unchanged
    assert plan.iterations("jepa") == 77


"""The A/B harness, scripts/ab.py: Student's t and Welch's test against hand-computed and table
values, the trainer's summaries read back, and a tiny A/B (2 arms x 2 seeds, 4 steps each) run
end to end on the CPU: table, curves, reuse, submission.json and the record folder."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, trainer_env

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import ab  # noqa: E402

BACKENDS = ["own"] + (["scipy"] if ab.stats_backend() == "scipy" else [])


def run_ab(argv: list[str], environ: dict[str, str]) -> tuple[int, str, str]:
    """ab.main in this process, its stdout and stderr captured."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = ab.main(argv, environ)
    return code, stdout.getvalue(), stderr.getvalue()


def comparison_row(table: str, arm: str) -> list[str]:
    """The cells of an arm's row in the 'Against the baseline' table."""
    section = table.split("## Against the baseline", 1)[1].split("## Runs", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith(f"| {arm} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def test_t_quantiles_match_the_printed_table():
    # Two-sided 95% (p = 0.975), one-sided 99% and 95% critical values from a t table.
    table = [(1, 0.975, 12.7062), (2, 0.975, 4.3027), (10, 0.975, 2.2281), (30, 0.975, 2.0423),
             (5, 0.99, 3.3649), (4, 0.95, 2.1318)]
    for backend in BACKENDS:
        for df, probability, expected in table:
            assert ab.student_t_quantile(probability, df, backend) == pytest.approx(expected, abs=5e-5)
            assert ab.student_t_quantile(1 - probability, df, backend) == pytest.approx(-expected, abs=5e-5)


def test_t_cdf_matches_closed_forms():
    # df = 1 is Cauchy; df = 2 and df = 4 have elementary CDFs.
    def closed_form(t: float, df: int) -> float:
        if df == 1:
            return 0.5 + math.atan(t) / math.pi
        if df == 2:
            return 0.5 + t / (2 * math.sqrt(2 + t * t))
        u = 1 + t * t / 4
        return 0.5 + 0.375 * (t / math.sqrt(u)) * (1 - t * t / (12 * u))

    for df in (1, 2, 4):
        for t in (-30.0, -3.1, -1.0, -0.2, 0.0, 0.5, 2.0, 7.5, 100.0):
            assert ab.student_t_cdf_own(t, df) == pytest.approx(closed_form(t, df), abs=1e-12), (t, df)
    assert ab.student_t_cdf_own(2.0, 5) == pytest.approx(0.9490302606, abs=1e-9)
    assert ab.student_t_cdf_own(1.96, 1e6) == pytest.approx(0.9750019662, abs=1e-8)  # -> the normal
    for probability in (0.001, 0.1, 0.5, 0.8, 0.995):
        for df in (0.8, 3.3, 40.0):  # Welch's df is rarely an integer
            t = ab.student_t_quantile_own(probability, df)
            assert ab.student_t_cdf_own(t, df) == pytest.approx(probability, abs=1e-11)


def test_own_t_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (0.7, 1.0, 2.5, 3.0, 7.3, 29.0, 200.0):
        for t in (-12.0, -2.4, -0.3, 0.0, 0.9, 3.7, 25.0):
            assert ab.student_t_cdf_own(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-11)
        for probability in (0.005, 0.025, 0.3, 0.9, 0.975, 0.995):
            assert ab.student_t_quantile_own(probability, df) == pytest.approx(stats.t.ppf(probability, df), rel=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_welch_equal_variances_by_hand(backend):
    # a = [1, 2, 3], b = [3, 4, 5]: means 2 and 4, both sample variances 1.
    # se^2 = 1/3 + 1/3 = 2/3; t = (2 - 4) / sqrt(2/3) = -sqrt(6) = -2.449490
    # df = (2/3)^2 / ((1/3)^2 / 2 + (1/3)^2 / 2) = (4/9) / (1/9) = 4
    # p = F_4(-sqrt 6) with F_4(t) = 1/2 + 3/8 * t/sqrt(u) * (1 - t^2 / (12 u)), u = 1 + t^2/4 = 5/2:
    #   = 1/2 - 3/8 * sqrt(6/2.5) * (1 - 6/30) = 1/2 - 0.3 * sqrt(2.4) = 0.035242
    # 95% CI: -2 -/+ t_{0.975, 4} * sqrt(2/3) = -2 -/+ 2.776445 * 0.816497 = [-4.266958, 0.266958]
    result = ab.welch_test([1.0, 2.0, 3.0], [3.0, 4.0, 5.0], backend)
    assert result.difference == pytest.approx(-2.0)
    assert result.std_error == pytest.approx(math.sqrt(2 / 3))
    assert result.t == pytest.approx(-math.sqrt(6))
    assert result.df == pytest.approx(4.0)
    assert result.p_one_sided == pytest.approx(0.5 - 0.3 * math.sqrt(2.4), abs=1e-10)
    assert result.p_one_sided == pytest.approx(0.035242, abs=1e-6)
    assert (result.ci_low, result.ci_high) == (pytest.approx(-4.266958, abs=1e-6), pytest.approx(0.266958, abs=1e-6))
    assert result.reason == ""


@pytest.mark.parametrize("backend", BACKENDS)
def test_welch_unequal_variances_by_hand(backend):
    # a = [1, 2, 3] (variance 1), b = [4, 6, 8] (variance 4): se^2 = 1/3 + 4/3 = 5/3,
    # t = -4 / sqrt(5/3) = -3.098387, df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = (25/9) / (17/18) = 50/17.
    result = ab.welch_test([1.0, 2.0, 3.0], [4.0, 6.0, 8.0], backend)
    assert result.t == pytest.approx(-4 / math.sqrt(5 / 3))
    assert result.df == pytest.approx(50 / 17)
    # One-sided p and CI: the t distribution at those values (scipy 1.17: 0.0273934, t_0.975 = 3.218759).
    assert result.p_one_sided == pytest.approx(ab.student_t_cdf_own(-4 / math.sqrt(5 / 3), 50 / 17), abs=1e-10)
    assert result.p_one_sided == pytest.approx(0.0273934, abs=1e-7)
    assert result.ci_low == pytest.approx(-4 - 3.218759 * math.sqrt(5 / 3), abs=1e-5)
    assert result.ci_high == pytest.approx(-4 + 3.218759 * math.sqrt(5 / 3), abs=1e-5)
    # Swapping the arms mirrors everything: H1 "b < a" is then almost surely false.
    mirrored = ab.welch_test([4.0, 6.0, 8.0], [1.0, 2.0, 3.0], backend)
    assert mirrored.p_one_sided == pytest.approx(1 - result.p_one_sided)


def test_welch_without_enough_seeds_or_variance():
    single = ab.welch_test([1.0], [2.0, 3.0])
    assert single.difference == pytest.approx(-1.5)
    assert single.p_one_sided is None and single.ci_low is None
    assert ">= 2 seeds per arm" in single.reason
    constant = ab.welch_test([1.0, 1.0], [1.0, 1.0])
    assert constant.p_one_sided is None and "zero variance" in constant.reason


# ---------------------------------------------------------------------------
# Command line and plan (no runs)
# ---------------------------------------------------------------------------


def test_arm_syntax():
    arm = ab.parse_arm("span:JEPA_MODE=span JEPA_WEIGHT=0.2")
    assert (arm.name, arm.settings) == ("span", {"JEPA_MODE": "span", "JEPA_WEIGHT": "0.2"})
    assert ab.parse_arm("jepa").settings == {}
    for bad in ("two words:JEPA_WEIGHT=0", "x:jepa_weight=0", "x:JEPA_WEIGHT", "x:SEED=3", "x:ITERATIONS=9",
                "x:MAX_WALLCLOCK_SECONDS=60", ":JEPA_WEIGHT=0"):
        with pytest.raises(ab.UserError):
            ab.parse_arm(bad)


def test_plan_budget_seeds_and_baseline(tmp_path):
    environ = {"PRESET": "tiny", "PATH": os.environ.get("PATH", "")}
    plan = ab.build_plan(ab.parse_args(["--seeds", "3,7", "--env", "MAX_WALLCLOCK_SECONDS=30", "--out",
                                        str(tmp_path / "my run")]), environ)
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


@pytest.mark.parametrize("argv, message", [
    (["--budget", "steps"], "--budget steps needs ITERATIONS"),
    ([], "--budget wallclock needs MAX_WALLCLOCK_SECONDS > 0"),
    (["--env", "MAX_WALLCLOCK_SECONDS=60", "--arm", "a:JEPA_WIEGHT=0", "--arm", "b"], "did you mean JEPA_WEIGHT"),
    (["--env", "MAX_WALLCLOCK_SECONDS=60", "--arm", "a:JEPA_WEIGHT=0.1", "--arm", "b"], "same configuration"),
    (["--env", "MAX_WALLCLOCK_SECONDS=60", "--arm", "a"], "at least two"),
    (["--env", "MAX_WALLCLOCK_SECONDS=60", "--seeds", "1,x"], "--seeds"),
    (["--env", "MAX_WALLCLOCK_SECONDS=60 SEED=4"], "--env sets SEED"),
    (["--env", "MAX_WALLCLOCK_SECONDS=60", "--write-submission", "nope"], "not an arm"),
    (["--budget", "steps", "--env", "ITERATIONS=5 MAX_WALLCLOCK_SECONDS=60"], "without a wall-clock cap"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, argv, message):
    code, _, stderr = run_ab(argv + ["--out", str(tmp_path / "out")], {"PRESET": "tiny"})
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# A tiny A/B end to end: 2 arms x 2 seeds, 4 steps each
# ---------------------------------------------------------------------------

ARMS = ["--arm", "jepa:JEPA_WEIGHT=0.5", "--arm", "vanilla:JEPA_WEIGHT=0"]
COMMON = ["--budget", "steps", "--env", "ITERATIONS=4 VAL_LOSS_EVERY=2"]


@pytest.fixture(scope="module")
def ab_run(tiny_dataset, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ab")
    environ = trainer_env(tiny_dataset, LOG_DIR=root / "logs")
    argv = ARMS + COMMON + ["--seeds", "1,2", "--out", str(root / "e2e")]
    code, stdout, stderr = run_ab(argv, environ)
    assert code == 0, stdout + stderr
    summaries = {path.stem: json.loads(path.read_text()) for path in (root / "logs").glob("*.json")}
    return {"root": root, "environ": environ, "argv": argv, "out": root / "e2e", "logs": root / "logs",
            "stdout": stdout, "summaries": summaries}


def roundtrip_values(ab_run: dict, arm: str) -> list[float]:
    return [ab_run["summaries"][f"e2e_{arm}_s{seed}"]["roundtrip_val_bpb"] for seed in (1, 2)]


def test_end_to_end_table_and_curves(ab_run):
    assert ab_run["stdout"].count("done in") == 4 and "reused" not in ab_run["stdout"]
    assert sorted(ab_run["summaries"]) == ["e2e_jepa_s1", "e2e_jepa_s2", "e2e_vanilla_s1", "e2e_vanilla_s2"]
    table = (ab_run["out"] / "table.md").read_text()
    assert table in ab_run["stdout"]  # printed as written
    assert f"statistics: {'scipy.stats.t' if ab.stats_backend() == 'scipy' else 'own Student t'}" in table
    for arm in ("jepa", "vanilla"):
        assert re.search(rf"^\| {arm} \| 2 \| \d\.\d{{4}} ± \d\.\d{{4}} \|", table, re.MULTILINE), table
    # The comparison is Welch's test on the summaries' roundtrip scores, as printed.
    expected = ab.welch_test(roundtrip_values(ab_run, "jepa"), roundtrip_values(ab_run, "vanilla"))
    cells = comparison_row(table, "jepa")
    assert cells[1] == f"{expected.difference:+.4f}" and cells[5] == f"{expected.p_one_sided:.3g}"
    assert "vanilla" in table.split("## Against the baseline", 1)[1].splitlines()[0]

    png = (ab_run["out"] / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 800 and height >= 300 and len(png) > 20_000  # two drawn panels, not an empty canvas


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
        assert f"final_int6_lzma_roundtrip_exact val_loss:{summary['roundtrip_val_loss']:.8f} " \
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


def test_reuse_refuses_summaries_of_other_settings(ab_run):
    argv = [arg.replace("ITERATIONS=4", "ITERATIONS=5") for arg in ab_run["argv"]]
    code, stdout, stderr = run_ab(argv, ab_run["environ"])
    assert code == 2 and "other settings" in stderr and "ITERATIONS: 4 there, 5 now" in stderr
    assert "run 1/4" not in stdout  # refused before anything ran


def test_write_submission_from_the_summaries(ab_run):
    extra = ab_run["root"] / "copy_of_submission.json"
    code, _, stderr = run_ab(ab_run["argv"] + ["--no-run", "--write-submission", "jepa", "--author", "A. Golfer",
                                               "--submission-path", str(extra)], ab_run["environ"])
    assert code == 0, stderr
    submission = json.loads((ab_run["out"] / "submission.json").read_text())
    assert json.loads(extra.read_text()) == submission
    jepa, vanilla = roundtrip_values(ab_run, "jepa"), roundtrip_values(ab_run, "vanilla")
    assert submission["val_bpb"] == pytest.approx(statistics.fmean(jepa), abs=1e-15)
    assert [entry["val_bpb"] for entry in submission["seed_results"]] == jepa and submission["seeds"] == [1, 2]
    assert submission["p_value"] == pytest.approx(ab.welch_test(jepa, vanilla).p_one_sided)
    assert submission["baseline"]["arm"] == "vanilla"
    assert submission["baseline"]["val_bpb"] == pytest.approx(statistics.fmean(vanilla))
    summaries = [ab_run["summaries"][f"e2e_jepa_s{seed}"] for seed in (1, 2)]
    assert submission["bytes_total"] == max(s["total_bytes"] for s in summaries)
    assert submission["bytes_code"] == summaries[0]["code_bytes"]
    assert submission["track"] == "non_record_16mb" and submission["author"] == "A. Golfer"
    assert submission["hardware"]["device"] == summaries[0]["device"] and submission["dataset"] == "test_sp1024"
    for key in ("github_id", "name", "blurb", "date", "val_loss", "trainer_sha256"):
        assert submission[key], key


def test_record_folder(ab_run):
    record = ab_run["root"] / "record"
    code, _, stderr = run_ab(ab_run["argv"] + ["--no-run", "--record", str(record)], ab_run["environ"])
    assert code == 0, stderr
    assert (record / "train_gpt_jepa.py").read_bytes() == (REPO_ROOT / "train_gpt_jepa.py").read_bytes()
    assert (record / "requirements.txt").read_bytes() == (REPO_ROOT / "requirements.txt").read_bytes()
    assert sorted(path.name for path in (record / "logs").iterdir()) == sorted(
        f"{run_id}{suffix}" for run_id in ab_run["summaries"] for suffix in (".json", ".txt"))
    readme = (record / "README.md").read_text()
    assert "![" in readme and "(curves.png)" in readme and "python3 scripts/ab.py" in readme
    assert all(f"RUN_ID={run_id} " in readme for run_id in ab_run["summaries"])
    assert "| jepa | 2 |" in readme
    assert json.loads((record / "submission.json").read_text())["arm"] == "jepa"
    assert (record / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second record into the same (non-empty) folder is refused.
    code, _, stderr = run_ab(ab_run["argv"] + ["--no-run", "--record", str(record)], ab_run["environ"])
    assert code == 2 and "not empty" in stderr


def test_record_refuses_a_log_from_another_trainer(ab_run):
    tampered_logs = ab_run["root"] / "tampered_logs"
    shutil.copytree(ab_run["logs"], tampered_logs)
    summary_file = tampered_logs / "e2e_vanilla_s2.json"
    summary = json.loads(summary_file.read_text())
    summary["code_sha256"] = "0" * 64
    summary_file.write_text(json.dumps(summary))
    record = ab_run["root"] / "tampered_record"
    argv = ARMS + COMMON + ["--env", f"LOG_DIR={tampered_logs}", "--seeds", "1,2", "--tag", "e2e", "--no-run",
                            "--out", str(ab_run["root"] / "tampered"), "--record", str(record)]
    code, _, stderr = run_ab(argv, ab_run["environ"])
    assert code == 2
    assert "e2e_vanilla_s2" in stderr and "0" * 64 in stderr and ab.trainer_sha256() in stderr
    assert not record.exists()


def test_single_seed_says_why_there_is_no_p_value(ab_run, monkeypatch):
    monkeypatch.setattr(ab, "_scipy_t", lambda: None)  # as on a machine without scipy
    argv = ARMS + COMMON + ["--seeds", "1", "--tag", "e2e", "--no-run", "--out", str(ab_run["root"] / "single")]
    code, _, stderr = run_ab(argv, ab_run["environ"])
    assert code == 0, stderr
    table = (ab_run["root"] / "single" / "table.md").read_text()
    assert "statistics: own Student t" in table
    cells = comparison_row(table, "jepa")
    assert cells[5] == "—" and "needs >= 2 seeds per arm" in cells[7]
    jepa, vanilla = (ab_run["summaries"][f"e2e_{arm}_s1"]["roundtrip_val_bpb"] for arm in ("jepa", "vanilla"))
    assert cells[1] == f"{jepa - vanilla:+.4f}"


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

"""A/B harness: arms x seeds of train_gpt_jepa.py at an equal budget, with Welch statistics,
curves, a submission.json and a record folder built from the runs' own summaries.

    # JEPA (the current configuration) against its vanilla control, 3 seeds, 600 s of training each
    python3 scripts/ab.py --seeds 1,2,3 --env "MAX_WALLCLOCK_SECONDS=600" \\
        --launcher "torchrun --standalone --nproc_per_node=8" --out ab/next_vs_vanilla
    # named arms, an equal number of steps, on the CPU
    PRESET=tiny python3 scripts/ab.py --arm span:"JEPA_MODE=span" --arm vanilla:"JEPA_WEIGHT=0" \\
        --seeds 1,2,3 --budget steps --env "ITERATIONS=200" --out ab/span_tiny
    # the same command again reuses every finished run; add a submission and a record folder
    python3 scripts/ab.py ... --no-run --write-submission span --record records/span_tiny

Every run is one trainer process with identical settings except its arm's variables and SEED,
run one after another (equal wall-clock budgets need an idle machine), interleaved by seed so
that drift of the machine hits every arm alike. Its logs are the trainer's own:
LOG_DIR/<RUN_ID>.txt and LOG_DIR/<RUN_ID>.json with RUN_ID = <tag>_<arm>_s<seed>; a run whose
summary says "completed" (with the same settings) is reused, never run again.

The score is the int6+lzma roundtrip val_bpb (lower is better). The first arm is the candidate;
the baseline is --baseline, else the arm with JEPA_WEIGHT=0, else the last one. Every other arm
is compared with it: difference of means, its 95% confidence interval and the one-sided Welch
p-value for "arm < baseline", the form in which the challenge accepts a claim (p < 0.01).
Student's t comes from scipy when it is installed, else from the implementation below.

Outputs in --out: table.md (also printed), curves.png, console/<RUN_ID>.log (each run's
stdout and stderr), artifacts/<RUN_ID>.int6.ptz, and submission.json with --write-submission.
Exit status: 0 done, 1 a run failed (its log tail is printed), 2 a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINER_PATH = REPO_ROOT / "train_gpt_jepa.py"

SIGNIFICANCE_LEVEL = 0.01  # the challenge's bar for a claimed improvement
CONFIDENCE = 0.95
WALLCLOCK_ITERATIONS = 1_000_000  # under a wall-clock budget: so high that the clock binds for every arm
LOG_TAIL_LINES = 20
ARM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
SETTING_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
# Set by this harness for every run: the user may not set them for all runs or for one arm.
HARNESS_SETTINGS = ("SEED", "RUN_ID", "ARTIFACT_PATH", "EVAL_ONLY")
# The budget is the same for every arm, so it lives in --env, never in an arm's settings.
BUDGET_SETTINGS = ("ITERATIONS", "MAX_WALLCLOCK_SECONDS", "LOG_DIR")
# Configuration fields that say where files go, not what is trained: ignored when checking
# that a reused summary was produced with the requested settings.
LOCATION_FIELDS = {"run_id", "seed", "log_dir", "artifact_path", "checkpoint_dir", "resume"}


class UserError(Exception):
    """A bad command line or missing input: printed as one "error:" line, exit status 2."""


class RunFailed(Exception):
    """A trainer run that did not complete: printed with its log tail, exit status 1."""


# =============================================================================
# STATISTICS: Student's t and Welch's test
# =============================================================================
# Own implementation, used when scipy is missing: the t distribution's CDF through the
# regularized incomplete beta function, I_x(a, b), evaluated by its continued fraction.


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    # The continued fraction converges fast only below the mean of Beta(a, b); above it use the
    # symmetry I_x(a, b) = 1 - I_{1-x}(b, a).
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_prefactor = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    prefactor = math.exp(log_prefactor) / a
    # I_x(a, b) = prefactor / (1 + d1 / (1 + d2 / (1 + ...))), evaluated with Lentz's method.
    tiny = 1e-300
    fraction, c_term, d_term = 1.0, 1.0, 0.0
    for index in range(1, 1000):
        m = index // 2
        if index % 2 == 1:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d_term = 1.0 + numerator * d_term
        d_term = 1.0 / (d_term if abs(d_term) > tiny else tiny)
        c_term = 1.0 + numerator / c_term
        c_term = c_term if abs(c_term) > tiny else tiny
        delta = c_term * d_term
        fraction *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return prefactor / fraction


def student_t_cdf_own(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom (df need not be an integer)."""
    # The two-sided tail P(|T| > |t|) is I_x(df/2, 1/2) with x = df / (df + t^2).
    two_sided_tail = regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - 0.5 * two_sided_tail if t > 0 else 0.5 * two_sided_tail


def student_t_quantile_own(probability: float, df: float) -> float:
    """The t with P(T <= t) = probability, by bisection on the CDF (monotone, so always safe)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability {probability} is not in (0, 1)")
    if probability < 0.5:
        return -student_t_quantile_own(1.0 - probability, df)
    low, high = 0.0, 1.0
    while student_t_cdf_own(high, df) < probability:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_cdf_own(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


def _scipy_t() -> Any | None:
    try:
        from scipy import stats
    except ImportError:
        return None
    return stats.t


def stats_backend() -> str:
    """'scipy' when scipy is importable (the issue asks for it), else 'own'."""
    return "scipy" if _scipy_t() is not None else "own"


def student_t_cdf(t: float, df: float, backend: str | None = None) -> float:
    if (backend or stats_backend()) == "scipy":
        return float(_scipy_t().cdf(t, df))
    return student_t_cdf_own(t, df)


def student_t_quantile(probability: float, df: float, backend: str | None = None) -> float:
    if (backend or stats_backend()) == "scipy":
        return float(_scipy_t().ppf(probability, df))
    return student_t_quantile_own(probability, df)


@dataclass
class WelchResult:
    """mean(sample) - mean(baseline), with Welch's t test of H1: sample < baseline."""

    difference: float | None
    std_error: float | None = None
    t: float | None = None
    df: float | None = None
    p_one_sided: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    reason: str = ""  # why there is no p-value, when there is none


def welch_test(sample: list[float], baseline: list[float], backend: str | None = None) -> WelchResult:
    """Welch's unequal-variance t test; df from the Welch-Satterthwaite equation."""
    n_sample, n_baseline = len(sample), len(baseline)
    if n_sample == 0 or n_baseline == 0:
        return WelchResult(None, reason="no completed run in one of the arms")
    difference = statistics.fmean(sample) - statistics.fmean(baseline)
    if n_sample < 2 or n_baseline < 2:
        return WelchResult(difference, reason=(
            f"no p-value: {min(n_sample, n_baseline)} seed in an arm; Welch's test needs >= 2 seeds per arm "
            f"(it estimates each arm's variance from its seeds)"))
    term_sample = statistics.variance(sample) / n_sample
    term_baseline = statistics.variance(baseline) / n_baseline
    variance_of_difference = term_sample + term_baseline
    if variance_of_difference == 0.0:
        return WelchResult(difference, reason="no p-value: every seed of both arms gave the same value "
                                              "(zero variance)")
    std_error = math.sqrt(variance_of_difference)
    t = difference / std_error
    df = variance_of_difference ** 2 / (term_sample ** 2 / (n_sample - 1) + term_baseline ** 2 / (n_baseline - 1))
    half_width = student_t_quantile(0.5 + CONFIDENCE / 2.0, df, backend) * std_error
    return WelchResult(difference, std_error, t, df, student_t_cdf(t, df, backend),
                       difference - half_width, difference + half_width)


# =============================================================================
# THE PLAN: arms, common settings, budget, runs
# =============================================================================


@dataclass
class Arm:
    name: str
    settings: dict[str, str]


@dataclass
class Run:
    arm: str
    seed: int
    run_id: str
    settings: dict[str, str]  # every variable this harness sets for the run (common + arm + its own)
    config: dict[str, Any]  # the trainer's resolved configuration for those settings
    summary: dict[str, Any] | None = None
    outcome: str = "pending"  # pending | reused | ran | failed


@dataclass
class Plan:
    arms: list[Arm]
    baseline: str
    seeds: list[int]
    budget: str
    common: dict[str, str]  # settings shared by every run: from the environment, --env and the budget
    from_environment: dict[str, str]  # the trainer variables found in the caller's environment
    base_environment: dict[str, str]  # what the trainer inherits besides its settings (PATH, OMP_*, ...)
    launcher: list[str]
    out_dir: Path
    log_dir: Path
    runs: list[Run] = field(default_factory=list)

    def arm_runs(self, arm: str) -> list[Run]:
        return [run for run in self.runs if run.arm == arm and run.outcome in ("reused", "ran")]

    def arm_values(self, arm: str, key: str) -> list[float]:
        return [run.summary[key] for run in self.arm_runs(arm) if run.summary.get(key) is not None]


def parse_settings(text: str, where: str) -> dict[str, str]:
    """'JEPA_MODE=span JEPA_WEIGHT=0.2' -> {'JEPA_MODE': 'span', 'JEPA_WEIGHT': '0.2'}."""
    settings: dict[str, str] = {}
    for token in shlex.split(text):
        name, equals, value = token.partition("=")
        if not equals or not SETTING_NAME.match(name):
            raise UserError(f"{where}: {token!r} is not NAME=VALUE with an upper-case variable name")
        settings[name] = value
    return settings


def parse_arm(text: str) -> Arm:
    """NAME:"ENV=V ENV=V" (or a bare NAME: the common configuration as it is)."""
    name, _, settings = text.partition(":")
    if not ARM_NAME.match(name):
        raise UserError(f"--arm {text!r}: expected NAME:\"ENV=V ...\" with a NAME of letters, digits, '-' and '_'")
    arm = Arm(name, parse_settings(settings, f"--arm {name}"))
    for variable in HARNESS_SETTINGS + BUDGET_SETTINGS:
        if variable in arm.settings:
            raise UserError(f"--arm {name} sets {variable}: every arm must share it (put it in --env), "
                            f"and SEED, RUN_ID, ARTIFACT_PATH are set by this harness")
    return arm


def is_zero(value: str) -> bool:
    try:
        return float(value) == 0.0
    except ValueError:
        return False


def load_trainer_module() -> Any:
    """The trainer's own configuration loader: settings are checked exactly as a run checks them."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import train_gpt_jepa

    return train_gpt_jepa


def build_plan(args: argparse.Namespace, environ: Mapping[str, str]) -> Plan:
    trainer = load_trainer_module()
    trainer_variables = {f.name.upper() for f in dataclasses.fields(trainer.Hyperparameters)} | {"PRESET"}

    arms = [parse_arm(text) for text in args.arm] or [Arm("jepa", {}), Arm("vanilla", {"JEPA_WEIGHT": "0"})]
    if len(arms) < 2:
        raise UserError("an A/B needs at least two --arm")
    if len({arm.name for arm in arms}) != len(arms):
        raise UserError("two arms have the same name")
    names = [arm.name for arm in arms]
    if args.baseline is not None and args.baseline not in names:
        raise UserError(f"--baseline {args.baseline}: not an arm (arms: {', '.join(names)})")
    vanilla_arms = [arm.name for arm in arms if is_zero(arm.settings.get("JEPA_WEIGHT", "nan"))]
    baseline = args.baseline or (vanilla_arms[0] if vanilla_arms else arms[-1].name)

    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: expected integers separated by commas, e.g. 1,2,3") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {args.seeds!r}: a seed is repeated")

    # Trainer variables already in the caller's environment apply to every run, as they would to
    # a plain launch; they are recorded as common settings so the table and the record show them.
    from_environment = {name: environ[name] for name in sorted(trainer_variables & set(environ))
                        if name not in HARNESS_SETTINGS}
    common = dict(from_environment)
    for text in args.env:
        extra = parse_settings(text, "--env")
        for variable in HARNESS_SETTINGS:
            if variable in extra:
                raise UserError(f"--env sets {variable}: this harness sets it for each run")
        common.update(extra)

    # Equal budget for every arm: steps, or training wall-clock (JEPA costs time per step).
    if args.budget == "steps":
        if "ITERATIONS" not in common:
            raise UserError('--budget steps needs ITERATIONS in --env, e.g. --env "ITERATIONS=2000"')
        if not is_zero(common.get("MAX_WALLCLOCK_SECONDS", "0")):
            raise UserError("--budget steps runs without a wall-clock cap: remove MAX_WALLCLOCK_SECONDS "
                            f"(={common['MAX_WALLCLOCK_SECONDS']}) from --env and the environment")
        common["MAX_WALLCLOCK_SECONDS"] = "0"
    else:
        try:
            seconds = float(common.get("MAX_WALLCLOCK_SECONDS", "nan"))
        except ValueError:
            seconds = math.nan
        if not seconds > 0:
            raise UserError('--budget wallclock needs MAX_WALLCLOCK_SECONDS > 0 in --env, '
                            'e.g. --env "MAX_WALLCLOCK_SECONDS=600"')
        common.setdefault("ITERATIONS", str(WALLCLOCK_ITERATIONS))

    out_dir = Path(args.out).resolve()
    tag = args.tag or re.sub(r"[^A-Za-z0-9_-]+", "_", out_dir.name).strip("_") or "ab"
    if not ARM_NAME.match(tag):
        raise UserError(f"--tag {tag!r}: use letters, digits, '-' and '_'")
    log_dir = REPO_ROOT / common.get("LOG_DIR", "logs")  # runs start in the repository root
    base_environment = {name: value for name, value in environ.items() if name not in trainer_variables}
    plan = Plan(arms, baseline, seeds, args.budget, common, from_environment, base_environment,
                shlex.split(args.launcher) or [sys.executable], out_dir, log_dir)

    configs_by_arm: dict[str, dict[str, Any]] = {}
    for seed in seeds:  # interleaved: seed 1 of every arm, then seed 2, ...
        for arm in arms:
            run_id = f"{tag}_{arm.name}_s{seed}"
            settings = {**common, **arm.settings, "SEED": str(seed), "RUN_ID": run_id,
                        "ARTIFACT_PATH": str(out_dir / "artifacts" / f"{run_id}.int6.ptz")}
            try:  # unknown names (typos) and malformed values fail here, before any run starts
                hyperparameters = trainer.load_hyperparameters({**base_environment, **settings})
            except trainer.ConfigError as error:
                raise UserError(f"arm {arm.name}: {error}") from None
            config = json.loads(json.dumps(dataclasses.asdict(hyperparameters)))
            plan.runs.append(Run(arm.name, seed, run_id, settings, config))
            configs_by_arm[arm.name] = {k: v for k, v in config.items() if k not in LOCATION_FIELDS}
    for index, arm in enumerate(arms):
        for other in arms[index + 1:]:
            if configs_by_arm[arm.name] == configs_by_arm[other.name]:
                raise UserError(f"arms {arm.name} and {other.name} resolve to the same configuration")
    return plan


# =============================================================================
# RUNNING AND READING SUMMARIES
# =============================================================================


def summary_path(plan: Plan, run: Run) -> Path:
    return plan.log_dir / f"{run.run_id}.json"


def read_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a readable summary ({error})") from None


def check_same_settings(plan: Plan, run: Run, summary: dict[str, Any]) -> None:
    """A reused summary must come from the settings requested now, or the A/B would mix experiments."""
    stored = summary.get("config", {})
    differences = [f"{name.upper()}: {stored[name]!r} there, {value!r} now" for name, value in run.config.items()
                   if name not in LOCATION_FIELDS and name in stored and stored[name] != value]
    if differences:
        raise UserError(f"{summary_path(plan, run)} was produced with other settings ({'; '.join(differences[:3])}): "
                        f"use another --tag or --out for this A/B")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (no output)"


def launch(plan: Plan, run: Run) -> None:
    """Run one trainer process from the repository root; its console output goes to a file."""
    console_path = plan.out_dir / "console" / f"{run.run_id}.log"
    console_path.parent.mkdir(parents=True, exist_ok=True)
    command = plan.launcher + [str(TRAINER_PATH)]
    environment = {**plan.base_environment, **run.settings}
    with open(console_path, "w", encoding="utf-8") as console:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=console, stderr=subprocess.STDOUT)
        try:
            return_code = process.wait()
        except KeyboardInterrupt:
            process.wait()  # the trainer got the same SIGINT: let it save its checkpoint and exit
            raise
    summary = read_summary(summary_path(plan, run))
    if return_code != 0 or summary is None or summary.get("status") != "completed":
        status = summary.get("status") if summary else "no summary"
        raise RunFailed(f"run {run.run_id} (arm {run.arm}, seed {run.seed}) failed: exit status {return_code}, "
                        f"{status}; last lines of {console_path}:\n{log_tail(console_path)}")
    run.summary = summary


def execute(plan: Plan, no_run: bool, keep_going: bool) -> list[str]:
    """Reuse completed runs, launch the others in order; return the failures' messages."""
    for run in plan.runs:  # every reused summary is checked before the first (long) run starts
        summary = read_summary(summary_path(plan, run))
        if summary is not None and summary.get("status") == "completed":
            check_same_settings(plan, run, summary)
            run.summary, run.outcome = summary, "reused"
    pending = [run for run in plan.runs if run.outcome == "pending"]
    if no_run and pending:
        described = []
        for run in pending:
            summary = read_summary(summary_path(plan, run))
            status = "missing"
            if summary is not None:
                status = f"status {summary.get('status')}: {summary.get('error', '')}".rstrip(": ")
            described.append(f"{summary_path(plan, run)} ({status})")
        raise UserError(f"--no-run: no completed summary for {len(pending)} run(s): {'; '.join(described)}")

    failures: list[str] = []
    for index, run in enumerate(plan.runs, start=1):
        print(f"run {index}/{len(plan.runs)}: {run.arm} seed {run.seed} ({run.run_id}) ... ", end="", flush=True)
        if run.outcome == "reused":
            print(f"reused: roundtrip val_bpb {run.summary['roundtrip_val_bpb']:.4f}", flush=True)
            continue
        started = time.perf_counter()
        try:
            launch(plan, run)
        except RunFailed as failure:
            print("failed", flush=True)
            run.outcome = "failed"
            if not keep_going:
                raise
            print(f"error: {failure}", file=sys.stderr, flush=True)
            failures.append(str(failure))
            continue
        run.outcome = "ran"
        print(f"done in {time.perf_counter() - started:.0f} s: roundtrip val_bpb "
              f"{run.summary['roundtrip_val_bpb']:.4f}", flush=True)
    return failures


# =============================================================================
# THE TABLE
# =============================================================================


def format_mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def format_settings(settings: Mapping[str, str]) -> str:
    return " ".join(f"{name}={shlex.quote(value)}" for name, value in settings.items())


def distinct(plan: Plan, key: str) -> str:
    values = sorted({str(run.summary.get(key)) for arm in plan.arms for run in plan.arm_runs(arm.name)})
    return ", ".join(values) or "—"


def compare(plan: Plan, arm: str, other: str, key: str = "roundtrip_val_bpb") -> WelchResult:
    return welch_test(plan.arm_values(arm, key), plan.arm_values(other, key))


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def format_optional(value: float | None, pattern: str) -> str:
    return format(value, pattern) if value is not None else "—"


def verdict(result: WelchResult) -> str:
    if result.p_one_sided is None:
        return result.reason
    if result.p_one_sided < SIGNIFICANCE_LEVEL:
        return f"significant at p < {SIGNIFICANCE_LEVEL}: lower than the baseline"
    return f"not significant at p < {SIGNIFICANCE_LEVEL}"


def budget_text(plan: Plan) -> str:
    if plan.budget == "steps":
        return f"steps: ITERATIONS={plan.common['ITERATIONS']} for every run, no wall-clock cap"
    return (f"wall-clock: MAX_WALLCLOCK_SECONDS={plan.common['MAX_WALLCLOCK_SECONDS']} of training per run "
            f"(ITERATIONS={plan.common['ITERATIONS']} only as an upper bound)")


def render_table(plan: Plan, command_line: str, failures: list[str]) -> str:
    lines = [f"# A/B: {' vs '.join(arm.name for arm in plan.arms)}", ""]
    for arm in plan.arms:
        described = f"`{format_settings(arm.settings)}`" if arm.settings else "the common settings as they are"
        lines.append(f"- arm `{arm.name}`{' (baseline)' if arm.name == plan.baseline else ''}: {described}")
    backend = stats_backend()
    backend_text = ("scipy.stats.t" if backend == "scipy"
                    else "own Student t (regularized incomplete beta), scipy not installed")
    shas = distinct(plan, "code_sha256")
    lines += [
        f"- common settings: `{format_settings(plan.common)}`",
        f"- seeds: {', '.join(map(str, plan.seeds))} (runs interleaved by seed)",
        f"- budget: {budget_text(plan)}",
        f"- device: {distinct(plan, 'device')}; processes per run: {distinct(plan, 'world_size')}",
        f"- dataset: {distinct(plan, 'dataset')}",
        f"- trainer sha256: {shas}" + (" (**runs from different trainer versions**)" if "," in shas else ""),
        f"- command: `{command_line}`",
        f"- statistics: {backend_text}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "## Per arm",
        "",
        "Mean ± sample standard deviation over the seeds; total bytes: the largest (artifact + code).",
        "",
        "| arm | n | roundtrip val_bpb | pre-quant val_bpb | sliding val_bpb | steps | step_avg_ms | total bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in plan.arms:
        runs = plan.arm_runs(arm.name)
        sliding = plan.arm_values(arm.name, "sliding_val_bpb")  # null when EVAL_STRIDE=0
        cells = [
            arm.name, str(len(runs)),
            format_mean_std(plan.arm_values(arm.name, "roundtrip_val_bpb")),
            format_mean_std(plan.arm_values(arm.name, "val_bpb")),
            format_mean_std(sliding) if len(sliding) == len(runs) else "—",
            format_mean_std(plan.arm_values(arm.name, "steps"), 0),
            format_mean_std(plan.arm_values(arm.name, "step_avg_ms"), 1),
            f"{max(run.summary['total_bytes'] for run in runs):,}" if runs else "—",
        ]
        lines.append(table_row(cells))
    lines += [
        "", f"## Against the baseline `{plan.baseline}` (roundtrip val_bpb, lower is better)", "",
        (f"Difference = mean(arm) - mean(baseline); {CONFIDENCE:.0%} CI from Welch's t with Welch-Satterthwaite "
         "df; one-sided p for H1: arm < baseline."),
        "",
        "| arm | difference | 95% CI | t | df | one-sided p | pre-quant difference | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in plan.arms:
        if arm.name == plan.baseline:
            continue
        result = compare(plan, arm.name, plan.baseline)
        pre_quant = compare(plan, arm.name, plan.baseline, "val_bpb")
        ci = f"[{result.ci_low:+.4f}, {result.ci_high:+.4f}]" if result.ci_low is not None else "—"
        lines.append(table_row([
            arm.name, format_optional(result.difference, "+.4f"), ci, format_optional(result.t, ".3f"),
            format_optional(result.df, ".1f"), format_optional(result.p_one_sided, ".3g"),
            format_optional(pre_quant.difference, "+.4f"), verdict(result),
        ]))
    lines += ["", "## Runs", "",
              table_row(["run", "arm", "seed", "outcome", "roundtrip val_bpb", "pre-quant val_bpb", "steps",
                         "step_avg_ms", "train s", "total bytes"]),
              "|---" * 10 + "|"]
    for run in plan.runs:
        cells = [run.run_id, run.arm, str(run.seed), run.outcome]
        if run.outcome in ("reused", "ran"):
            summary = run.summary
            cells += [f"{summary['roundtrip_val_bpb']:.4f}", f"{summary['val_bpb']:.4f}", str(summary["steps"]),
                      f"{summary['step_avg_ms']:.1f}", f"{summary['train_time_ms'] / 1000:.1f}",
                      f"{summary['total_bytes']:,}"]
        lines.append(table_row(cells + ["—"] * (10 - len(cells))))
    notes = []
    if failures:
        notes.append(f"- {len(failures)} run(s) failed (--keep-going): the statistics use the completed runs only.")
    if plan.budget == "wallclock":
        notes += [f"- warning: {run.run_id} stopped at ITERATIONS={run.summary['steps']} before the wall-clock cap: "
                  f"the budget was not equal in time" for run in plan.runs
                  if run.summary and run.outcome != "failed" and run.summary["steps"] >= run.config["iterations"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


# =============================================================================
# THE CURVES
# =============================================================================


def write_curves(plan: Plan, path: Path) -> None:
    """val_bpb against step and against training time: one colour per arm, one line per seed."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("curves.png needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, arm in enumerate(plan.arms):
        for number, run in enumerate(plan.arm_runs(arm.name)):
            history = run.summary["val_history"]
            label = arm.name if number == 0 else None
            style = {"color": colours(index % 10), "marker": "o", "markersize": 3, "linewidth": 1.2, "alpha": 0.85}
            val_bpb = [point["val_bpb"] for point in history]
            by_step.plot([point["step"] for point in history], val_bpb, label=label, **style)
            by_time.plot([point["train_time_ms"] / 1000 for point in history], val_bpb, label=label, **style)
            # The score itself: the int6+lzma roundtrip of the final weights, at the last point.
            by_step.plot([run.summary["steps"]], [run.summary["roundtrip_val_bpb"]], "x", color=colours(index % 10))
            by_time.plot([run.summary["train_time_ms"] / 1000], [run.summary["roundtrip_val_bpb"]], "x",
                         color=colours(index % 10))
    for axes, label in ((by_step, "step"), (by_time, "training time (s)")):
        axes.set_xlabel(label)
        axes.set_ylabel("val_bpb")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:  # no completed run: no legend (and no warning)
            axes.legend(title="arm (x: roundtrip)")
    figure.suptitle(f"val_bpb during training: {distinct(plan, 'device')}, dataset {distinct(plan, 'dataset')}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# =============================================================================
# SUBMISSION AND RECORD FOLDER
# =============================================================================


def trainer_sha256() -> str:
    # Hashed as the trainer hashes itself (its text, UTF-8 encoded), so the two always agree.
    return hashlib.sha256(TRAINER_PATH.read_text(encoding="utf-8").encode("utf-8")).hexdigest()


def build_submission(plan: Plan, arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """submission.json in the records' schema, every number taken from the arm's summaries."""
    runs = plan.arm_runs(arm)
    if not runs:
        raise UserError(f"--write-submission {arm}: no completed run of that arm")
    # The p-value is against the baseline; for the baseline itself, against the candidate.
    other = plan.baseline if arm != plan.baseline else next(a.name for a in plan.arms if a.name != arm)
    result = compare(plan, arm, other)
    summaries = [run.summary for run in runs]
    settings = next(a.settings for a in plan.arms if a.name == arm)
    caps = {run.config["max_wallclock_seconds"] for run in runs}
    record_track = (all(s["world_size"] == 8 and not s["device"].startswith("cpu") for s in summaries)
                    and all(0 < cap <= 600 for cap in caps))
    mean_bpb = statistics.fmean(s["roundtrip_val_bpb"] for s in summaries)
    other_mean = statistics.fmean(plan.arm_values(other, "roundtrip_val_bpb")) if plan.arm_runs(other) else None
    comparison = f" vs {other_mean:.4f} (difference {result.difference:+.4f})" if other_mean is not None else ""
    p_text = f"one-sided Welch p = {result.p_one_sided:.3g}" if result.p_one_sided is not None else result.reason
    blurb = (f"A/B of arm {arm} ({format_settings(settings) or 'the common settings'}) against {other}: "
             f"{len(runs)} seeds ({', '.join(str(r.seed) for r in runs)}), {budget_text(plan)}, dataset "
             f"{distinct(plan, 'dataset')}, {distinct(plan, 'device')}. Mean int6+lzma roundtrip val_bpb "
             f"{mean_bpb:.4f}{comparison}; {p_text}.")
    return {
        "author": args.author, "github_id": args.github_id,
        "name": args.name or f"JEPA A/B: {arm} vs {other}", "blurb": blurb,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "track": "10min_16mb" if record_track else "non_record_16mb",
        "val_loss": statistics.fmean(s["roundtrip_val_loss"] for s in summaries), "val_bpb": mean_bpb,
        "bytes_total": max(s["total_bytes"] for s in summaries),
        "bytes_code": max(s["code_bytes"] for s in summaries),
        "arm": arm, "settings": settings, "common_settings": plan.common, "budget": budget_text(plan),
        "seeds": [run.seed for run in runs],
        "seed_results": [{"seed": run.seed, "run_id": run.run_id, "val_bpb": run.summary["roundtrip_val_bpb"],
                          "val_loss": run.summary["roundtrip_val_loss"], "pre_quant_val_bpb": run.summary["val_bpb"],
                          "steps": run.summary["steps"], "step_avg_ms": run.summary["step_avg_ms"],
                          "bytes_total": run.summary["total_bytes"]} for run in runs],
        "baseline": {"arm": other, "val_bpb": other_mean,
                     "settings": next(a.settings for a in plan.arms if a.name == other)},
        "val_bpb_difference": result.difference, "p_value": result.p_one_sided,
        "p_value_note": result.reason or f"one-sided Welch t-test, H1: {arm} < {other}",
        "hardware": {"device": distinct(plan, "device"), "world_size": runs[0].summary["world_size"]},
        "dataset": distinct(plan, "dataset"),
        "train_time_seconds": statistics.fmean(s["train_time_ms"] for s in summaries) / 1000,
        "trainer_sha256": distinct(plan, "code_sha256"),
    }


def display_path(path: str | Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def reproduce_lines(plan: Plan) -> list[str]:
    """Each run as one trainer command: its settings, as this harness passed them."""
    launcher = " ".join(shlex.quote(part) for part in plan.launcher)
    launcher = "python3" if plan.launcher == [sys.executable] else launcher
    lines = []
    for run in plan.runs:
        settings = {name: display_path(value) if name == "ARTIFACT_PATH" else value
                    for name, value in run.settings.items()}
        lines.append(f"{format_settings(settings)} {launcher} train_gpt_jepa.py")
    return lines


def demote_headings(markdown: str) -> str:
    """table.md without its title, headings one level down, to sit under the README's own."""
    lines = markdown.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join("#" + line if line.startswith("#") else line for line in lines)


def assemble_record(plan: Plan, record_dir: Path, submission: dict[str, Any], table: str, command_line: str) -> None:
    if record_dir.exists() and any(record_dir.iterdir()):
        raise UserError(f"--record {record_dir}: the folder exists and is not empty")
    current = trainer_sha256()
    runs = [run for run in plan.runs if run.outcome in ("reused", "ran")]
    for run in runs:  # the record must hold the code that produced every one of its logs
        if run.summary.get("code_sha256") != current:
            raise UserError(f"--record: {run.run_id} was produced by train_gpt_jepa.py with sha256 "
                            f"{run.summary.get('code_sha256')}, but {display_path(TRAINER_PATH)} now has sha256 "
                            f"{current}: check out the version that produced the logs, or rerun")
        for suffix in (".txt", ".json"):
            if not (plan.log_dir / f"{run.run_id}{suffix}").is_file():
                raise UserError(f"--record: {plan.log_dir / (run.run_id + suffix)} is missing")
    (record_dir / "logs").mkdir(parents=True, exist_ok=True)
    for run in runs:
        for suffix in (".txt", ".json"):
            shutil.copy2(plan.log_dir / f"{run.run_id}{suffix}", record_dir / "logs" / f"{run.run_id}{suffix}")
    shutil.copy2(TRAINER_PATH, record_dir / "train_gpt_jepa.py")
    shutil.copy2(REPO_ROOT / "requirements.txt", record_dir / "requirements.txt")
    shutil.copy2(plan.out_dir / "curves.png", record_dir / "curves.png")
    (record_dir / "table.md").write_text(table, encoding="utf-8")
    (record_dir / "submission.json").write_text(json.dumps(submission, indent=2) + "\n", encoding="utf-8")
    readme = [
        f"# {submission['name']}", "", submission["blurb"], "",
        (f"Score: mean int6+lzma roundtrip val_bpb **{submission['val_bpb']:.4f}** over seeds "
         f"{', '.join(map(str, submission['seeds']))}; largest submission {submission['bytes_total']:,} bytes."), "",
        "## What was run", "", demote_headings(table).strip(), "",
        "![val_bpb against step and training time](curves.png)", "",
        "## How to reproduce", "",
        f"From the repository root of train_gpt_jepa (this folder's `train_gpt_jepa.py`, sha256 {current}):", "",
        "    " + command_line, "",
        "which runs, one after another:", "",
        *["    " + line for line in reproduce_lines(plan)], "",
        "## Files", "",
        "- `train_gpt_jepa.py`: the trainer that produced every log here (sha256 checked against each log)",
        "- `requirements.txt`, `submission.json`, `table.md`, `curves.png`",
        "- `logs/<RUN_ID>.txt` (full log, starting with the trainer's source) and `logs/<RUN_ID>.json` (summary)",
    ]
    (record_dir / "README.md").write_text("\n".join(readme) + "\n", encoding="utf-8")


# =============================================================================
# MAIN
# =============================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", default=[], metavar='NAME:"ENV=V ..."',
                        help="an arm (repeat); default: jepa (the common settings) and vanilla (JEPA_WEIGHT=0)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds, each run for every arm (default 1,2,3)")
    parser.add_argument("--env", action="append", default=[], metavar='"ENV=V ..."',
                        help="settings for every run (repeatable); the budget's variable goes here")
    parser.add_argument("--budget", choices=("steps", "wallclock"), default="wallclock",
                        help="equal ITERATIONS (steps) or equal MAX_WALLCLOCK_SECONDS of training (default)")
    parser.add_argument("--launcher", default="", help='command before the trainer, e.g. "torchrun --standalone '
                        '--nproc_per_node=8" (default: this Python)')
    parser.add_argument("--out", required=True, help="folder for table.md, curves.png, console logs, artifacts")
    parser.add_argument("--tag", help="RUN_ID prefix (default: the --out folder's name)")
    parser.add_argument("--baseline", help="the arm others are compared with (default: the one with JEPA_WEIGHT=0, "
                        "else the last)")
    parser.add_argument("--no-run", action="store_true", help="launch nothing: only read the existing summaries")
    parser.add_argument("--keep-going", action="store_true", help="after a failed run, go on with the others")
    parser.add_argument("--write-submission", metavar="ARM", help="write OUT/submission.json from that arm's runs")
    parser.add_argument("--submission-path", help="also write the submission there (e.g. submission.json)")
    parser.add_argument("--record", metavar="DIR", help="assemble a record folder: README, submission, trainer, logs")
    parser.add_argument("--author", default="unknown")
    parser.add_argument("--github-id", default="unknown")
    parser.add_argument("--name", help="the submission's name (default: generated from the arms)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    args = parse_args(argv)
    try:
        plan = build_plan(args, environ)
        names = [arm.name for arm in plan.arms]
        if args.write_submission is not None and args.write_submission not in names:
            raise UserError(f"--write-submission {args.write_submission}: not an arm (arms: {', '.join(names)})")
        if args.record and Path(args.record).exists() and any(Path(args.record).iterdir()):  # before hours of runs
            raise UserError(f"--record {args.record}: the folder exists and is not empty")
        # The trainer variables of the caller's environment are part of the experiment: show them.
        command_line = " ".join(filter(None, [format_settings(plan.from_environment), "python3 scripts/ab.py",
                                              shlex.join(argv)]))

        failures = execute(plan, args.no_run, args.keep_going)
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        table = render_table(plan, command_line, failures)
        (plan.out_dir / "table.md").write_text(table, encoding="utf-8")
        print()
        print(table, end="")
        write_curves(plan, plan.out_dir / "curves.png")
        print(f"\nwrote {plan.out_dir / 'table.md'} and {plan.out_dir / 'curves.png'}")

        # A record needs a submission.json: by default the candidate's (the first non-baseline arm).
        candidate = next(name for name in names if name != plan.baseline)
        submission_arm = args.write_submission or (candidate if args.record else None)
        if submission_arm is not None:
            submission = build_submission(plan, submission_arm, args)
            text = json.dumps(submission, indent=2) + "\n"
            for path in filter(None, [plan.out_dir / "submission.json", args.submission_path]):
                Path(path).write_text(text, encoding="utf-8")
                print(f"wrote {path}")
            if args.record and failures:
                raise RunFailed(f"--record: not assembled, {len(failures)} run(s) failed; a record holds a complete A/B")
            if args.record:
                assemble_record(plan, Path(args.record), submission, table, command_line)
                print(f"wrote the record folder {args.record}")
        return 1 if failures else 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunFailed as failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue (completed runs are reused)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

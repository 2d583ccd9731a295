"""A/B harness: arms x seeds of train_gpt_jepa.py at an equal budget, paired statistics by seed,
a leaderboard and pictures built from the runs' own summaries (scripts/make_record.py turns one
arm's runs into a record folder).

    # JEPA (the current configuration) against its vanilla control at equal compute, 3 seeds:
    # the vanilla arm runs 2000 steps, the JEPA arm as many as the same compute buys
    python3 scripts/ab.py --seeds 1,2,3 --env "ITERATIONS=2000" --out campaign/ab/next_vs_vanilla
    # a sweep: the cartesian grid (6 arms) beside the vanilla baseline, on the CPU
    PRESET=tiny python3 scripts/ab.py --grid "JEPA_WEIGHT=0.001,0.01,0.1 TARGET_EMA_DECAY=0,0.99" \\
        --seeds 1,2,3 --env "ITERATIONS=200" --out campaign/ab/sweep_tiny
    # the per-step question: every arm the same number of steps
    PRESET=tiny python3 scripts/ab.py --arm span:"JEPA_MODE=span" --arm vanilla:"JEPA_WEIGHT=0" \\
        --budget steps --env "ITERATIONS=200" --tag span_tiny   # --out campaign/ab/span_tiny
    # the same command again reuses every finished run; --seeds 1,2,3,4,5 adds two seeds only
    python3 scripts/make_record.py --ab campaign/ab/span_tiny --arm span --out records/span_tiny

Budgets (the question each answers):
- compute (default): "is it better for the same compute?" Before any run, every arm's step time
  is measured in one process (scripts/bench.py: the real Trainer.step, interleaved rounds) on
  the device the runs use; the baseline runs ITERATIONS and every other arm
  round(ITERATIONS * t_baseline / t_arm) steps, with no wall-clock cap, so a busy machine can
  slow a run but never change its result. The measurement is kept in OUT/step_times.json and
  reused by reruns (new arms are measured beside the baseline).
- steps: "is it better per step?" (the challenge's sign of life): ITERATIONS for every arm.
- wallclock: MAX_WALLCLOCK_SECONDS of training per run; only on dedicated machines, since on a
  shared one the budget measures the machine's load.

Every run is one trainer process with identical settings except its arm's variables, SEED and
(under compute) ITERATIONS, run one after another and interleaved by seed. Its logs are the
trainer's own: LOG_DIR/<RUN_ID>.txt and .json with RUN_ID = <tag>_<arm>_s<seed>; a run whose
summary says "completed" with the same settings is reused, never run again.

The score is the roundtrip val_bpb (the exported artifact loaded back; lower is better). The
baseline is --baseline, else the arm with JEPA_WEIGHT=0 (with --grid one is added if no arm has
it), else the last arm. Arms with the same SEED start from the same backbone and see the same
batches, so each arm is compared with the baseline by the paired t test on per-seed differences
(Welch's test beside it), Holm-corrected across the candidate arms, with the minimum detectable
difference of the observed spread (scripts/ab_stats.py). The challenge accepts a claim at p < 0.01.

Outputs in --out (default: campaign/ab/<tag>; one of --out and --tag is needed): table.md (also
printed; scripts/ab_report.py), effects.png and effects.json (paired differences with CIs, step-time
cost), curves.png, step_times.json (compute budget), plan.json (the A/B's arms, settings, seeds and
runs, which make_record.py reads), console/<RUN_ID>.log and artifacts/<RUN_ID>.int6.ptz.
Exit status: 0 done, 1 a run failed (its log tail is printed), 2 a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
import ab_figures  # noqa: E402
import ab_stats  # noqa: E402
# table.md and effects.json; budget_text and distinct stay importable as ab.* for scripts/make_record.py.
from ab_report import budget_text, distinct, effects_record, format_settings, render_table  # noqa: E402, F401
from atomic_write import write_atomically  # noqa: E402

REPO_ROOT = SCRIPTS.parent
TRAINER_PATH = REPO_ROOT / "train_gpt_jepa.py"
BENCH_PATH = SCRIPTS / "bench.py"
DEFAULT_OUT_ROOT = Path("campaign") / "ab"  # in the repository: --out defaults to campaign/ab/<tag>

WALLCLOCK_ITERATIONS = 1_000_000  # under a wall-clock budget: so high that the clock binds for every arm
LOG_TAIL_LINES = 20
CURVE_ARMS = 4  # curves.png draws the best few arms of the leaderboard and the baseline
STEP_TIMES_FILE = "step_times.json"
PLAN_FILE = "plan.json"  # the A/B's definition, what scripts/make_record.py reads back
ARM_NAME = re.compile(r"^[A-Za-z0-9_.,=+-]+$")  # also a file name: no spaces or slashes
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
    budget: str  # compute | steps | wallclock
    common: dict[str, str]  # settings shared by every run: from the environment, --env and the budget
    from_environment: dict[str, str]  # the trainer variables found in the caller's environment
    base_environment: dict[str, str]  # what the trainer inherits besides its settings (PATH, OMP_*, ...)
    launcher: list[str]
    out_dir: Path
    log_dir: Path
    runs: list[Run] = field(default_factory=list)
    # --budget compute: each arm's step time (ms), ratio to the baseline's and ITERATIONS.
    step_times: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: dict[str, int] = field(default_factory=dict)  # steps, rounds, warmup of that measurement

    def arm_runs(self, arm: str) -> list[Run]:
        return [run for run in self.runs if run.arm == arm and run.outcome in ("reused", "ran")]

    def arm_values(self, arm: str, key: str) -> list[float]:
        return [run.summary[key] for run in self.arm_runs(arm) if run.summary.get(key) is not None]

    def seed_scores(self, arm: str, key: str = "roundtrip_val_bpb") -> dict[int, float]:
        return {run.seed: run.summary[key] for run in self.arm_runs(arm) if run.summary.get(key) is not None}

    def arm_settings(self, arm: str) -> dict[str, str]:
        return next(a.settings for a in self.arms if a.name == arm)

    def iterations(self, arm: str) -> int | None:
        entry = self.step_times.get(arm)
        return entry["iterations"] if entry else None


def parse_settings(text: str, where: str) -> dict[str, str]:
    """'JEPA_MODE=span JEPA_WEIGHT=0.2' -> {'JEPA_MODE': 'span', 'JEPA_WEIGHT': '0.2'}."""
    settings: dict[str, str] = {}
    for token in shlex.split(text):
        name, equals, value = token.partition("=")
        if not equals or not SETTING_NAME.match(name):
            raise UserError(f"{where}: {token!r} is not NAME=VALUE with an upper-case variable name")
        settings[name] = value
    return settings


def check_arm_settings(settings: Mapping[str, str], where: str) -> None:
    for variable in HARNESS_SETTINGS + BUDGET_SETTINGS:
        if variable in settings:
            raise UserError(f"{where} sets {variable}: every arm must share it (put it in --env), "
                            f"and SEED, RUN_ID, ARTIFACT_PATH are set by this harness")


def parse_arm(text: str) -> Arm:
    """NAME:"ENV=V ENV=V" (or a bare NAME: the common configuration as it is)."""
    name, _, settings = text.partition(":")
    if not ARM_NAME.match(name):
        raise UserError(f"--arm {text!r}: expected NAME:\"ENV=V ...\" with a NAME of letters, digits and . , = + - _")
    arm = Arm(name, parse_settings(settings, f"--arm {name}"))
    check_arm_settings(arm.settings, f"--arm {name}")
    return arm


def grid_arm_name(settings: Mapping[str, str]) -> str:
    """{'JEPA_WEIGHT': '0.01', 'TARGET_EMA_DECAY': '0'} -> 'jepa_weight=0.01+target_ema_decay=0'."""
    return "+".join(f"{name.lower()}={value}" for name, value in settings.items())


def parse_grid(text: str) -> list[Arm]:
    """"A=1,2 B=x,y" -> the cartesian arms A=1 B=x, A=1 B=y, A=2 B=x, A=2 B=y, named from their
    settings. Values are separated by commas, or by '|' when a value itself holds commas
    (JEPA_OFFSETS=1|1,2,4,8)."""
    axes: list[tuple[str, list[str]]] = []
    for name, values in parse_settings(text, "--grid").items():
        choices = values.split("|" if "|" in values else ",")
        if not all(choices) or len(set(choices)) != len(choices):
            raise UserError(f"--grid {name}={values}: expected distinct non-empty values separated by ',' (or '|')")
        axes.append((name, choices))
    if not axes:
        raise UserError("--grid: expected NAME=V1,V2 ... with at least one variable")
    arms = []
    for combination in itertools.product(*[choices for _, choices in axes]):
        settings = {name: value for (name, _), value in zip(axes, combination)}
        arm = Arm(grid_arm_name(settings), settings)
        if not ARM_NAME.match(arm.name):
            raise UserError(f"--grid: the arm name {arm.name!r} would not be a file name: use --arm for it")
        check_arm_settings(settings, f"--grid {text!r}")
        arms.append(arm)
    return arms


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


def trainer_sha256() -> str:
    # Hashed as the trainer hashes itself (its text, UTF-8 encoded), so the two always agree.
    return hashlib.sha256(TRAINER_PATH.read_text(encoding="utf-8").encode("utf-8")).hexdigest()


def choose_arms(args: argparse.Namespace) -> tuple[list[Arm], str]:
    """The arms (explicit, then grid) and the baseline's name."""
    arms = [parse_arm(text) for text in args.arm]
    for text in args.grid:
        arms += parse_grid(text)
    if not arms:
        arms = [Arm("jepa", {}), Arm("vanilla", {"JEPA_WEIGHT": "0"})]
    vanilla_arms = [arm.name for arm in arms if is_zero(arm.settings.get("JEPA_WEIGHT", "nan"))]
    if args.grid and args.baseline is None and not vanilla_arms:
        arms.append(Arm("vanilla", {"JEPA_WEIGHT": "0"}))  # a sweep is always against the control
        vanilla_arms = ["vanilla"]
    if len(arms) < 2:
        raise UserError("an A/B needs at least two arms (--arm, --grid)")
    names = [arm.name for arm in arms]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"two arms have the same name: {', '.join(duplicates)}")
    if args.baseline is not None and args.baseline not in names:
        raise UserError(f"--baseline {args.baseline}: not an arm (arms: {', '.join(names)})")
    return arms, args.baseline or (vanilla_arms[0] if vanilla_arms else arms[-1].name)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(seed) for seed in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected integers separated by commas, e.g. 1,2,3") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: a seed is repeated")
    return seeds


def output_folder_and_tag(args: argparse.Namespace) -> tuple[Path, str]:
    """--out and the RUN_ID prefix: each defaults from the other (the tag to the folder's name, the
    folder to campaign/ab/<tag>, where the campaign keeps its A/Bs)."""
    if args.out is None and args.tag is None:
        raise UserError("give --out FOLDER or --tag NAME (the outputs then go to campaign/ab/NAME)")
    out_dir = Path(args.out).resolve() if args.out is not None else None
    tag = args.tag or re.sub(r"[^A-Za-z0-9_-]+", "_", out_dir.name).strip("_") or "ab"
    if not ARM_NAME.match(tag):
        raise UserError(f"--tag {tag!r}: use letters, digits, '-' and '_'")
    return out_dir or REPO_ROOT / DEFAULT_OUT_ROOT / tag, tag


def common_settings(args: argparse.Namespace, environ: Mapping[str, str],
                    trainer_variables: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The trainer variables of the caller's environment, and the settings every run shares."""
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
    return from_environment, common


def apply_budget(budget: str, common: dict[str, str], resolve: Callable[[dict[str, str]], Any]) -> None:
    """Check --env against the budget and fix the settings every run shares."""
    if budget in ("steps", "compute"):
        if "ITERATIONS" not in common:
            example = "the baseline's steps" if budget == "compute" else "every arm's steps"
            raise UserError(f'--budget {budget} needs ITERATIONS ({example}) in --env, e.g. --env "ITERATIONS=2000"')
        if not is_zero(common.get("MAX_WALLCLOCK_SECONDS", "0")):
            raise UserError(f"--budget {budget} runs without a wall-clock cap: remove MAX_WALLCLOCK_SECONDS "
                            f"(={common['MAX_WALLCLOCK_SECONDS']}) from --env and the environment")
        common["MAX_WALLCLOCK_SECONDS"] = "0"
        if budget == "compute" and common.get("FINAL_EMA", "-1").strip() == "-1":
            # FINAL_EMA=-1 switches on at ITERATIONS >= 1000: arms with scaled step counts must
            # not differ in it, so every arm gets the baseline's resolved value.
            common["FINAL_EMA"] = "1" if resolve(common).final_ema_enabled() else "0"
        return
    try:
        seconds = float(common.get("MAX_WALLCLOCK_SECONDS", "nan"))
    except ValueError:
        seconds = math.nan
    if not seconds > 0:
        raise UserError('--budget wallclock needs MAX_WALLCLOCK_SECONDS > 0 in --env, '
                        'e.g. --env "MAX_WALLCLOCK_SECONDS=600"')
    common.setdefault("ITERATIONS", str(WALLCLOCK_ITERATIONS))


def refuse_identical_arms(arms: list[Arm], common: dict[str, str], resolve: Callable[[dict[str, str]], Any]) -> None:
    """Two arms that train the same thing would make a meaningless comparison: refuse them before
    any measurement or run."""
    configs: dict[str, dict[str, Any]] = {}
    for arm in arms:
        try:
            config = dataclasses.asdict(resolve({**common, **arm.settings}))
        except UserError as error:
            raise UserError(f"arm {arm.name}: {error}") from None
        configs[arm.name] = {k: v for k, v in config.items() if k not in LOCATION_FIELDS}
    for index, arm in enumerate(arms):
        for other in arms[index + 1:]:
            if configs[arm.name] == configs[other.name]:
                raise UserError(f"arms {arm.name} and {other.name} resolve to the same configuration")


# Measures {arm: settings} in one process; returns ({arm: (step ms, ratio to the baseline, per-round
# ratios)}, device).
StepTimer = Callable[["Plan", dict[str, dict[str, str]]], tuple[dict[str, tuple[float, float, list[float]]], str]]


def build_plan(args: argparse.Namespace, environ: Mapping[str, str], step_timer: StepTimer | None = None) -> Plan:
    """Arms, seeds, settings and, under --budget compute, every arm's ITERATIONS from step times
    measured by step_timer (injectable for tests)."""
    out_dir, tag = output_folder_and_tag(args)
    trainer = load_trainer_module()
    trainer_variables = {f.name.upper() for f in dataclasses.fields(trainer.Hyperparameters)} | {"PRESET"}
    arms, baseline = choose_arms(args)
    seeds = parse_seeds(args.seeds)
    from_environment, common = common_settings(args, environ, trainer_variables)
    base_environment = {name: value for name, value in environ.items() if name not in trainer_variables}

    def resolve(settings: dict[str, str]) -> Any:
        try:  # unknown names (typos) and malformed values fail here, before any run starts
            return trainer.load_hyperparameters({**base_environment, **settings})
        except trainer.ConfigError as error:
            raise UserError(str(error)) from None

    apply_budget(args.budget, common, resolve)
    log_dir = REPO_ROOT / common.get("LOG_DIR", "logs")  # runs start in the repository root
    plan = Plan(arms, baseline, seeds, args.budget, common, from_environment, base_environment,
                shlex.split(args.launcher) or [sys.executable], out_dir, log_dir,
                calibration={"steps": args.calibration_steps, "rounds": args.calibration_rounds,
                             "warmup": args.calibration_warmup})
    refuse_identical_arms(arms, common, resolve)
    if args.budget == "compute":
        plan.step_times = calibrate(plan, args, step_timer or measure_step_times)
    for seed in seeds:  # interleaved: seed 1 of every arm, then seed 2, ...
        for arm in arms:
            run_id = f"{tag}_{arm.name}_s{seed}"
            settings = {**common, **arm.settings, "SEED": str(seed), "RUN_ID": run_id,
                        "ARTIFACT_PATH": str(out_dir / "artifacts" / f"{run_id}.int6.ptz")}
            if plan.step_times:
                settings["ITERATIONS"] = str(plan.iterations(arm.name))
            config = json.loads(json.dumps(dataclasses.asdict(resolve(settings))))
            plan.runs.append(Run(arm.name, seed, run_id, settings, config))
    return plan


# =============================================================================
# RUNNING: trainer processes, their summaries, reuse
# =============================================================================


def read_json(path: Path, what: str, advice: str = "") -> Any:
    """A JSON file this harness or the trainer wrote; None when it does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a readable {what} ({error}){advice}") from None


def write_json(path: Path, record: Any, sort_keys: bool = False) -> None:
    # Atomically: a reader (or a rerun after a crash) never meets half a summary, plan or measurement.
    write_atomically(path, json.dumps(record, indent=2, sort_keys=sort_keys) + "\n")


def run_logged(command: list[str], environment: Mapping[str, str], console_path: Path) -> int:
    """Run a command from the repository root with its output in console_path; its exit status."""
    console_path.parent.mkdir(parents=True, exist_ok=True)
    with open(console_path, "w", encoding="utf-8") as console:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=dict(environment), stdout=console,
                                   stderr=subprocess.STDOUT)
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.wait()  # the child got the same SIGINT: let it save its checkpoint and exit
            raise


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (no output)"


def summary_path(plan: Plan, run: Run) -> Path:
    return plan.log_dir / f"{run.run_id}.json"


def read_summary(path: Path) -> dict[str, Any] | None:
    return read_json(path, "summary")


def check_same_settings(plan: Plan, run: Run, summary: dict[str, Any], no_run: bool = False) -> None:
    """A reused summary must come from the settings requested now, or the A/B would mix
    experiments; and, when new runs will join it, from the same trainer code (--no-run only
    reads: its table names every trainer sha256 it found)."""
    if not no_run and summary.get("code_sha256") != trainer_sha256():
        raise UserError(f"{summary_path(plan, run)} was produced by train_gpt_jepa.py with sha256 "
                        f"{summary.get('code_sha256')}, not the current {trainer_sha256()}: new runs would mix "
                        f"trainer versions; use another --tag or --out (or --no-run to read the old A/B)")
    stored = summary.get("config", {})
    differences = [f"{name.upper()}: {stored[name]!r} there, {value!r} now" for name, value in run.config.items()
                   if name not in LOCATION_FIELDS and name in stored and stored[name] != value]
    if differences:
        raise UserError(f"{summary_path(plan, run)} was produced with other settings ({'; '.join(differences[:3])}): "
                        f"use another --tag or --out for this A/B")


def launch(plan: Plan, run: Run) -> None:
    """Run one trainer process from the repository root; its console output goes to a file."""
    console_path = plan.out_dir / "console" / f"{run.run_id}.log"
    return_code = run_logged(plan.launcher + [str(TRAINER_PATH)], {**plan.base_environment, **run.settings},
                             console_path)
    summary = read_summary(summary_path(plan, run))
    if return_code != 0 or summary is None or summary.get("status") != "completed":
        status = summary.get("status") if summary else "no summary"
        raise RunFailed(f"run {run.run_id} (arm {run.arm}, seed {run.seed}) failed: exit status {return_code}, "
                        f"{status}; last lines of {console_path}:\n{log_tail(console_path)}")
    # The summary records the A/B it belongs to: budget, baseline and, under compute, the
    # measured step-time ratio that set this run's ITERATIONS.
    summary["ab"] = {"tag": run.run_id.rsplit(f"_{run.arm}_s", 1)[0], "arm": run.arm, "baseline": plan.baseline,
                     "budget": plan.budget, "iterations": run.config["iterations"],
                     "step_time_ratio": plan.step_times.get(run.arm, {}).get("ratio")}
    write_json(summary_path(plan, run), summary, sort_keys=True)
    run.summary = summary


def describe_missing(plan: Plan, run: Run) -> str:
    """Where a run's summary should be and why it does not count (missing, or not completed)."""
    summary = read_summary(summary_path(plan, run))
    status = "missing"
    if summary is not None:
        status = f"status {summary.get('status')}: {summary.get('error', '')}".rstrip(": ")
    return f"{summary_path(plan, run)} ({status})"


def execute(plan: Plan, no_run: bool, keep_going: bool) -> list[str]:
    """Reuse completed runs, launch the others in order; return the failures' messages."""
    for run in plan.runs:  # every reused summary is checked before the first (long) run starts
        summary = read_summary(summary_path(plan, run))
        if summary is not None and summary.get("status") == "completed":
            check_same_settings(plan, run, summary, no_run)
            run.summary, run.outcome = summary, "reused"
    pending = [run for run in plan.runs if run.outcome == "pending"]
    if no_run and pending:
        raise UserError(f"--no-run: no completed summary for {len(pending)} run(s): "
                        f"{'; '.join(describe_missing(plan, run) for run in pending)}")

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
# EQUAL COMPUTE: step times measured in one process
# =============================================================================


def timing_settings(plan: Plan, arm: Arm) -> dict[str, str]:
    """What determines an arm's step time: its settings without the step count and log folder."""
    return {name: value for name, value in {**plan.common, **arm.settings}.items()
            if name not in ("ITERATIONS", "LOG_DIR")}


def launcher_world_size(launcher: list[str]) -> int:
    """Processes a torchrun launcher starts (--nproc_per_node x --nnodes); 1 for a plain Python."""
    values = {"--nproc_per_node": 1, "--nnodes": 1}
    for index, part in enumerate(launcher):
        flag, equals, text = part.partition("=")
        if not equals and index + 1 < len(launcher):  # "--nnodes 2" as well as "--nnodes=2"
            text = launcher[index + 1]
        flag = flag.replace("--nproc-per-node", "--nproc_per_node")  # torchrun accepts both spellings
        if flag in values and text.isdigit():
            values[flag] = int(text)
    return values["--nproc_per_node"] * values["--nnodes"]


def per_rank_settings(plan: Plan, settings: dict[str, str]) -> dict[str, str]:
    """What one rank of the runs does per step, as one process: its share of the global batch in
    the micro-steps it would run (GRAD_ACCUM_STEPS defaults to 8 // WORLD_SIZE). Timing the whole
    global batch in one process instead would spread JEPA's per-step costs (the EMA update, the
    head's all-reduce) over 8 micro-steps and under-price them."""
    world_size = launcher_world_size(plan.launcher)
    if world_size == 1:
        return settings
    trainer = load_trainer_module()
    try:
        hp = trainer.load_hyperparameters({**plan.base_environment, **settings})
        accumulation = trainer.validate_hyperparameters(hp, world_size)
    except trainer.ConfigError as error:
        raise UserError(f"--budget compute with {world_size} processes per run: {error}") from None
    return {**settings, "TRAIN_BATCH_TOKENS": str(hp.train_batch_tokens // world_size),
            "GRAD_ACCUM_STEPS": str(accumulation)}


def measurement_context(plan: Plan) -> dict[str, str]:
    """What a stored measurement must share with a new run for its ratios to apply: the
    baseline, the trainer's code, the launcher and the machine."""
    import torch  # loaded with the trainer already

    machine = (f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available()
               else f"cpu x{os.cpu_count()}")
    launcher = "" if plan.launcher == [sys.executable] else " ".join(plan.launcher)  # the venv's path aside
    return {"baseline": plan.baseline, "trainer_sha256": trainer_sha256(), "launcher": launcher, "machine": machine}


def compute_iterations(baseline_iterations: int, ratios: Mapping[str, float]) -> dict[str, int]:
    """Equal compute: an arm whose step costs ratio x the baseline's gets 1/ratio of its steps."""
    return {arm: max(1, round(baseline_iterations / ratio)) for arm, ratio in ratios.items()}


def calibrate(plan: Plan, args: argparse.Namespace, step_timer: StepTimer) -> dict[str, dict[str, Any]]:
    """Every arm's step time relative to the baseline's, measured in one process, and its
    ITERATIONS. Kept in OUT/step_times.json: a rerun reuses it (the same ITERATIONS, so finished
    runs stay valid); arms that are new or whose settings changed are measured beside the
    baseline; a changed baseline (its settings or which arm it is) remeasures everything, and so
    does, before new runs, another trainer, launcher or machine. --no-run reads what the runs used."""
    path = plan.out_dir / STEP_TIMES_FILE
    stored = read_json(path, "measurement", "; delete it to measure again") or {"arms": {}}
    by_name = {arm.name: arm for arm in plan.arms}
    valid = {name: entry for name, entry in stored.get("arms", {}).items()
             if name in by_name and entry.get("settings") == timing_settings(plan, by_name[name])}
    # Arms of other invocations (a subset rerun with --no-run, say) keep their measurement, as
    # long as the baseline it is relative to is unchanged.
    others = {name: entry for name, entry in stored.get("arms", {}).items() if name not in by_name}
    context = measurement_context(plan)
    changed = [key for key, value in context.items() if stored.get(key) != value
               and (key == "baseline" or not args.no_run)]
    if plan.baseline not in valid or changed:
        if stored.get("arms") and changed:
            print(f"step times in {path} are stale ({', '.join(changed)} changed): measuring again", flush=True)
        valid, others = {}, {}
    missing = [arm.name for arm in plan.arms if arm.name not in valid]
    if missing:
        if args.no_run:
            raise UserError(f"--no-run: no step times for arm(s) {', '.join(missing)} in {path} "
                            f"(--budget compute measures them before running)")
        measured = [plan.baseline] + [name for name in missing if name != plan.baseline]
        print(f"measuring step times of {len(measured)} arm(s) in one process "
              f"({args.calibration_steps} steps x {args.calibration_rounds} rounds) ...", flush=True)
        timings, device = step_timer(plan, {name: per_rank_settings(plan, timing_settings(plan, by_name[name]))
                                            for name in measured})
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for name in missing:
            step_ms, ratio, ratio_rounds = timings[name]
            valid[name] = {"settings": timing_settings(plan, by_name[name]), "step_ms": step_ms,
                           "ratio": 1.0 if name == plan.baseline else ratio, "ratio_rounds": ratio_rounds,
                           "device": device, "measured_at": when, "steps": args.calibration_steps,
                           "rounds": args.calibration_rounds}
    baseline_iterations = int(plan.common["ITERATIONS"])
    iterations = compute_iterations(baseline_iterations, {name: entry["ratio"] for name, entry in valid.items()})
    for name, entry in valid.items():
        entry["iterations"] = iterations[name]
    if not missing:  # nothing measured now: the context is the stored measurement's
        context = {key: stored.get(key) for key in context}
    write_json(path, {**context, "baseline_iterations": baseline_iterations,
                      "arms": {**{arm.name: valid[arm.name] for arm in plan.arms}, **others}})
    return {arm.name: valid[arm.name] for arm in plan.arms}


def measure_step_times(plan: Plan, settings_by_arm: dict[str, dict[str, str]]
                       ) -> tuple[dict[str, tuple[float, float, list[float]]], str]:
    """scripts/bench.py --spec in a subprocess with the runs' environment (threads, visible devices):
    one process builds every arm's Trainer and times its real step in interleaved rounds; each
    ratio is the median over rounds of the arm's time over the baseline's in the same round."""
    console_path = plan.out_dir / "console" / "step_times.log"
    with tempfile.TemporaryDirectory() as folder:
        spec, result = Path(folder) / "spec.json", Path(folder) / "times.json"
        spec.write_text(json.dumps(settings_by_arm), encoding="utf-8")
        command = [sys.executable, str(BENCH_PATH), "--spec", str(spec), "--baseline", plan.baseline,
                   "--json", str(result)]
        for option in ("steps", "rounds", "warmup"):
            command += [f"--{option}", str(plan.calibration[option])]
        code = run_logged(command, plan.base_environment, console_path)
        if code != 0 or not result.is_file():
            raise RunFailed(f"measuring step times failed (exit status {code}); last lines of {console_path}:\n"
                            f"{log_tail(console_path)}")
        measured = json.loads(result.read_text(encoding="utf-8"))
    print(console_path.read_text(encoding="utf-8"), end="", flush=True)
    baseline_rounds = next(row["rounds_ms"] for row in measured["paths"] if row["path"] == plan.baseline)
    for row in measured["paths"]:  # the per-round ratios show how precise the median is
        row["ratio_rounds"] = [t / b for t, b in zip(row["rounds_ms"], baseline_rounds)]
    return ({row["path"]: (row["step_avg_ms"], row["ratio"], row["ratio_rounds"]) for row in measured["paths"]},
            measured["device"])


# =============================================================================
# OUTPUTS: the analysis, table.md, effects.json, the pictures and plan.json
# =============================================================================


def analyse(plan: Plan) -> list[ab_stats.Comparison]:
    """Every candidate arm against the baseline on the roundtrip score (the pre-quantisation one
    beside it), Holm-adjusted across them and sorted as the leaderboard (scripts/ab_stats.py)."""
    names = [arm.name for arm in plan.arms]
    return ab_stats.compare_with_baseline({name: plan.seed_scores(name) for name in names},
                                          {name: plan.seed_scores(name, "val_bpb") for name in names}, plan.baseline)


def write_pictures(plan: Plan, effects: dict[str, Any]) -> None:
    """effects.json, effects.png (paired differences and step-time cost) and curves.png."""
    write_json(plan.out_dir / "effects.json", effects)
    runs = [{"arm": run.arm, "seed": run.seed, "val_history": run.summary.get("val_history", []),
             "train_history": run.summary.get("train_history", []), "steps": run.summary["steps"],
             "roundtrip_val_bpb": run.summary["roundtrip_val_bpb"], "train_time_ms": run.summary["train_time_ms"]}
            for arm in plan.arms for run in plan.arm_runs(arm.name)]
    try:
        ab_figures.write_effects_figure(effects, plan.out_dir / "effects.png")
        ab_figures.write_curves_figure(effects, runs, plan.out_dir / "curves.png", max_arms=CURVE_ARMS)
    except ImportError:
        raise UserError("the pictures need matplotlib: pip install matplotlib") from None


def write_plan(plan: Plan, command_line: str) -> None:
    """OUT/plan.json: everything that defines the A/B (arms, baseline, seeds, budget, settings,
    each run's id, settings and resolved configuration, the step times), so that a record folder
    can be built from it later without repeating the command."""
    write_json(plan.out_dir / PLAN_FILE, {
        "command": command_line, "arms": [dataclasses.asdict(arm) for arm in plan.arms], "baseline": plan.baseline,
        "seeds": plan.seeds, "budget": plan.budget, "common": plan.common, "from_environment": plan.from_environment,
        "launcher": plan.launcher, "log_dir": str(plan.log_dir), "step_times": plan.step_times,
        "calibration": plan.calibration,
        "runs": [{"arm": run.arm, "seed": run.seed, "run_id": run.run_id, "settings": run.settings,
                  "config": run.config} for run in plan.runs],
    })


def load_plan(out_dir: Path) -> tuple[Plan, str]:
    """The plan an earlier invocation wrote to OUT/plan.json, with every run's summary read back
    (all must be completed); returns it and the command that made it."""
    path = out_dir / PLAN_FILE
    record = read_json(path, "plan")
    if record is None:
        raise UserError(f"{path} not found: point at the --out folder of an A/B run by scripts/ab.py")
    plan = Plan([Arm(**arm) for arm in record["arms"]], record["baseline"], record["seeds"], record["budget"],
                record["common"], record["from_environment"], {}, record["launcher"], out_dir.resolve(),
                Path(record["log_dir"]), step_times=record["step_times"], calibration=record["calibration"])
    plan.runs = [Run(**run) for run in record["runs"]]
    execute(plan, no_run=True, keep_going=False)
    return plan, record["command"]


# =============================================================================
# MAIN
# =============================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", default=[], metavar='NAME:"ENV=V ..."',
                        help="an arm (repeat); default: jepa (the common settings) and vanilla (JEPA_WEIGHT=0)")
    parser.add_argument("--grid", action="append", default=[], metavar='"ENV=V1,V2 ENV=V1,V2"',
                        help="a sweep (repeatable): the cartesian arms, named from their settings; a vanilla "
                        "baseline (JEPA_WEIGHT=0) is added when no arm has one")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds, each run for every arm (default 1,2,3)")
    parser.add_argument("--env", action="append", default=[], metavar='"ENV=V ..."',
                        help="settings for every run (repeatable); the budget's variable goes here")
    parser.add_argument("--budget", choices=("compute", "steps", "wallclock"), default="compute",
                        help="compute (default): the baseline runs ITERATIONS, the others as many steps as the "
                        "same compute buys (step times measured in one process); steps: ITERATIONS for every "
                        "arm; wallclock: MAX_WALLCLOCK_SECONDS of training (dedicated machines only)")
    # Many short rounds: on a shared machine load comes in bursts of seconds, and a round's arms
    # run back to back, so per-round ratios are paired and their median resists the bursts.
    parser.add_argument("--calibration-steps", type=int, default=2, help="compute budget: timed steps per round")
    parser.add_argument("--calibration-rounds", type=int, default=10, help="compute budget: interleaved rounds")
    parser.add_argument("--calibration-warmup", type=int, default=2, help="compute budget: untimed steps first")
    parser.add_argument("--launcher", default="", help='command before the trainer, e.g. "torchrun --standalone '
                        '--nproc_per_node=8" (default: this Python)')
    parser.add_argument("--out", help="folder for table.md, curves.png, console logs, artifacts "
                        "(default: campaign/ab/TAG in the repository)")
    parser.add_argument("--tag", help="RUN_ID prefix (default: the --out folder's name); one of --out and --tag "
                        "is needed")
    parser.add_argument("--baseline", help="the arm others are compared with (default: the one with JEPA_WEIGHT=0, "
                        "else the last)")
    parser.add_argument("--no-run", action="store_true", help="launch nothing: only read the existing summaries")
    parser.add_argument("--keep-going", action="store_true", help="after a failed run, go on with the others")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    args = parse_args(argv)
    try:
        plan = build_plan(args, environ)
        # The trainer variables of the caller's environment are part of the experiment: show them.
        command_line = " ".join(filter(None, [format_settings(plan.from_environment), "python3 scripts/ab.py",
                                              shlex.join(argv)]))

        failures = execute(plan, args.no_run, args.keep_going)
        comparisons = analyse(plan)
        table = render_table(plan, command_line, failures, comparisons)
        write_atomically(plan.out_dir / "table.md", table)
        print()
        print(table, end="")
        write_pictures(plan, effects_record(plan, comparisons))
        write_plan(plan, command_line)
        print(f"\nwrote {plan.out_dir / 'table.md'}, effects.png, effects.json, curves.png and {PLAN_FILE}")
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

"""Build a Parameter Golf record folder from one arm of an A/B run by scripts/ab.py.

    python3 scripts/make_record.py --ab campaign/ab/tiny_next --arm vanilla --out records/tiny_vanilla
    python3 scripts/make_record.py --ab ... --arm ... --out ... --author "A. Golfer" --github-id agolfer
    python3 scripts/make_record.py --ab ... --arm ... --out ... --entry .    # also the project's own entry

The folder is what the challenge takes (its README: all counted code in train_gpt.py, which must
compile and run inside the folder; artifact = code bytes + compressed model bytes <= 16,000,000):

- train_gpt.py: train_gpt_jepa.py with the arm's settings and the A/B's common settings (the arm's
  own ITERATIONS under a compute budget included) baked in as defaults, so that
  `SEED=N torchrun --standalone --nproc_per_node=8 train_gpt.py` with nothing else set reproduces
  the run; the environment still wins (DATA_PATH, TOKENIZER_PATH, ...). Docstrings and comments are
  removed through the syntax tree (ast), and the result is wrapped (unless --no-wrap) in a short
  stdlib-only script that decodes it (base85 + LZMA) and executes it; the trainer writes the decoded
  source, not the wrapper, at the top of each log, and counts the wrapper's bytes as its code.
- train_seed<N>.log per seed (the run's full log), submission.json in the schema of the
  challenge's recent records (plus the A/B's comparison), README.md, requirements.txt with only
  what train_gpt.py imports.

The track is 10min_16mb only when every run used 8 GPUs, trained within 600 s and evaluated within
600 s; otherwise non_record_16mb. Check the result with scripts/check_record.py.
Exit status: 0 done, 2 a usage error (one line, nothing written).
"""

from __future__ import annotations

import argparse
import ast
import base64
import datetime
import hashlib
import json
import lzma
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
import ab  # noqa: E402
from atomic_write import write_atomically  # noqa: E402

REPO_ROOT = SCRIPTS.parent
TRAINER_PATH = REPO_ROOT / "train_gpt_jepa.py"
RECORD_CODE_NAME = "train_gpt.py"
# Settings a record never bakes in: each run's own (seed, ids, output paths) and the switches of
# a second process. Data and tokenizer paths are baked only when the A/B set them.
RUN_SPECIFIC_SETTINGS = ("SEED", "RUN_ID", "ARTIFACT_PATH", "LOG_DIR", "CHECKPOINT_DIR", "RESUME", "EVAL_ONLY",
                         "FLOAT_WEIGHTS_PATH")
# The challenge's record track: 8 GPUs, 10 minutes of training, 10 minutes of evaluation.
RECORD_WORLD_SIZE = 8
RECORD_SECONDS = 600.0
# pip names of the modules a trainer may import that are not in the standard library.
PIP_NAMES = {"torch": "torch", "numpy": "numpy", "sentencepiece": "sentencepiece", "brotli": "brotli",
             "zstandard": "zstandard"}
# The compressor modules the trainer imports by name only when the run uses them.
COMPRESSOR_MODULES = {"brotli": "brotli", "zstd": "zstandard"}


class UserError(Exception):
    """A bad flag or input; printed as one line, exit status 2."""


# =============================================================================
# THE CODE: strip, bake the settings in, wrap
# =============================================================================


def _drop_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        body = body[1:]
    return body or [ast.Pass()]


def strip_source(source: str, baked_settings: dict[str, str]) -> str:
    """The trainer's source without docstrings and comments (ast.unparse keeps neither), with
    BAKED_SETTINGS set to the given values. The program is the same syntax tree, so it runs as the
    original does; only its text is shorter."""
    tree = ast.parse(source)
    tree.body = [statement for statement in _drop_docstring(tree.body) if not isinstance(statement, ast.Pass)]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            node.body = _drop_docstring(node.body)
    targets = [node for node in tree.body if isinstance(node, ast.AnnAssign)
               and isinstance(node.target, ast.Name) and node.target.id == "BAKED_SETTINGS"]
    if len(targets) != 1:
        raise UserError(f"{TRAINER_PATH.name} has no module-level BAKED_SETTINGS to bake the settings into")
    targets[0].value = ast.Dict(keys=[ast.Constant(name) for name in baked_settings],
                                values=[ast.Constant(str(value)) for value in baked_settings.values()])
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


def wrap_source(source: str, title: str) -> str:
    """A stdlib-only script that decodes the source and runs it as __main__. TRAINER_SOURCE tells
    the trainer what to log; linecache lets tracebacks show the decoded lines."""
    payload = base64.b85encode(lzma.compress(source.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)).decode("ascii")
    return (
        f"# {title}: train_gpt_jepa.py, settings baked in, stripped; the decoded source opens each log.\n"
        "import base64, linecache, lzma\n"
        f'TRAINER_SOURCE = lzma.decompress(base64.b85decode("{payload}")).decode("utf-8")\n'
        'linecache.cache["train_gpt.decoded.py"] = (len(TRAINER_SOURCE), None, TRAINER_SOURCE.splitlines(True), '
        '"train_gpt.decoded.py")\n'
        'exec(compile(TRAINER_SOURCE, "train_gpt.decoded.py", "exec"))\n'
    )


def imported_packages(source: str) -> list[str]:
    """The pip packages a source imports at its top level (standard library excluded)."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return sorted(PIP_NAMES[name] for name in names if name not in sys.stdlib_module_names and name != "__future__")


def requirement_lines(packages: list[str]) -> list[str]:
    """Each package with the version specifier the repository's requirements.txt gives it."""
    specifiers = {}
    for line in (REPO_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name = requirement.split(">")[0].split("=")[0].split("<")[0].strip()
            specifiers[name] = requirement
    return [specifiers.get(package, package) for package in packages]


# =============================================================================
# THE RUNS: one arm of an A/B, their summaries and logs
# =============================================================================


def trainer_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def baked_settings(run: ab.Run) -> dict[str, str]:
    """What a seed's run was given, minus the run's own settings: the arm's, the common ones and,
    under a compute budget, the arm's ITERATIONS."""
    return {name: value for name, value in run.settings.items() if name not in RUN_SPECIFIC_SETTINGS}


def arm_runs(plan: ab.Plan, arm: str, trainer_text: str) -> list[ab.Run]:
    """The arm's completed runs, each checked to come from the current trainer (the folder's code
    must be the code that produced its logs) and to have its full log."""
    if arm not in [candidate.name for candidate in plan.arms]:
        raise UserError(f"--arm {arm}: not an arm of this A/B (arms: {', '.join(a.name for a in plan.arms)})")
    runs = plan.arm_runs(arm)
    current = trainer_sha256(trainer_text)
    for run in runs:
        if run.summary.get("code_sha256") != current:
            raise UserError(f"{run.run_id} was produced by train_gpt_jepa.py with sha256 {run.summary.get('code_sha256')}, "
                            f"but {TRAINER_PATH.name} now has sha256 {current}: check out the version that produced "
                            f"the logs, or rerun the A/B")
        if not (plan.log_dir / f"{run.run_id}.txt").is_file():
            raise UserError(f"{plan.log_dir / (run.run_id + '.txt')} is missing: a record holds every seed's full log")
    settings = {json.dumps(baked_settings(run), sort_keys=True) for run in runs}
    if len(settings) != 1:
        raise UserError(f"the runs of arm {arm} differ in more than their seeds: a record has one set of settings")
    return runs


def track_of(runs: list[ab.Run]) -> tuple[str, str]:
    """The challenge's track and why: the record track needs 8 GPUs, <= 600 s of training and
    <= 600 s of evaluation in every run."""
    reasons = []
    for run in runs:
        summary = run.summary
        if summary["world_size"] != RECORD_WORLD_SIZE or summary["device"].startswith("cpu"):
            reasons.append(f"seed {run.seed} ran on {summary['world_size']} x {summary['device']}, not 8 GPUs")
        if summary.get("train_and_calibration_ms", summary["train_time_ms"]) > 1000 * RECORD_SECONDS:
            reasons.append(f"seed {run.seed} trained {summary['train_time_ms'] / 1000:.0f} s, over {RECORD_SECONDS:.0f} s")
        if summary.get("roundtrip_eval_time_ms", 0.0) > 1000 * RECORD_SECONDS:
            reasons.append(f"seed {run.seed} evaluated {summary['roundtrip_eval_time_ms'] / 1000:.0f} s, "
                           f"over {RECORD_SECONDS:.0f} s")
    if reasons:
        return "non_record_16mb", "; ".join(dict.fromkeys(reasons))
    return "10min_16mb", f"every run: {RECORD_WORLD_SIZE} GPUs, <= {RECORD_SECONDS:.0f} s training and evaluation"


# =============================================================================
# submission.json and README.md
# =============================================================================


def comparison_fields(plan: ab.Plan, arm: str) -> dict[str, Any]:
    """The arm against the A/B's baseline (the baseline itself against the best candidate, the
    difference negated): the paired test by seed with its CI, Holm's p and the MDE."""
    comparisons = ab.analyse(plan)
    if not comparisons:
        return {}
    if arm != plan.baseline:
        comparison, sign, other = next(c for c in comparisons if c.arm == arm), 1.0, plan.baseline
        p_one_sided = comparison.paired.p_one_sided
    else:
        comparison, sign, other = comparisons[0], -1.0, comparisons[0].arm
        # H1 for the baseline: it is lower than the candidate, the other tail of the candidate's test.
        p_one_sided = None if comparison.paired.p_one_sided is None else 1.0 - comparison.paired.p_one_sided
    paired = comparison.paired
    low, high = ((paired.ci_low, paired.ci_high) if sign > 0 else
                 (None if paired.ci_high is None else -paired.ci_high, None if paired.ci_low is None else -paired.ci_low))
    other_values = plan.arm_values(other, "roundtrip_val_bpb")
    return {
        "compared_with": {"arm": other, "settings": plan.arm_settings(other), "iterations": plan.iterations(other),
                          "val_bpb": statistics.fmean(other_values) if other_values else None},
        "val_bpb_difference": None if paired.difference is None else sign * paired.difference,
        "val_bpb_difference_ci95": [low, high],
        "p_value": p_one_sided,
        "p_value_note": paired.reason or (f"paired one-sided t test by seed, H1: {arm} < {other}"
                                          + (f"; Holm p {comparison.p_holm:.3g} over {len(comparisons)} candidate "
                                             f"arm(s)" if arm != plan.baseline else "")),
        "minimum_detectable_difference": comparison.mde,
    }


def seed_result(run: ab.Run) -> dict[str, Any]:
    summary = run.summary
    return {"val_loss": summary["roundtrip_val_loss"], "val_bpb": summary["roundtrip_val_bpb"],
            "artifact_bytes": summary["artifact_bytes"], "steps": summary["steps"],
            "step_avg_ms": summary["step_avg_ms"], "pre_quant_val_bpb": summary["val_bpb"],
            "sliding_val_bpb": summary.get("sliding_val_bpb"), "ttt_val_bpb": summary.get("ttt_val_bpb"),
            "train_time_ms": summary["train_time_ms"]}


def build_submission(plan: ab.Plan, arm: str, runs: list[ab.Run], args: argparse.Namespace, code_bytes: int,
                     code_sizes: dict[str, int]) -> dict[str, Any]:
    """submission.json: the recent records' schema, every figure from the runs' summaries, the
    code counted as the folder's train_gpt.py."""
    summaries = [run.summary for run in runs]
    track, track_reason = track_of(runs)
    # Where the folder lives, relative to the repository when inside it (the entry points at it).
    out = Path(args.out).resolve()
    record_folder = str(out.relative_to(REPO_ROOT)) if out.is_relative_to(REPO_ROOT) else str(args.out)
    losses = [s["roundtrip_val_loss"] for s in summaries]
    scores = [s["roundtrip_val_bpb"] for s in summaries]
    settings = baked_settings(runs[0])
    comparison = comparison_fields(plan, arm)
    difference = comparison.get("val_bpb_difference")
    versus = (f" against {comparison['compared_with']['arm']} {comparison['compared_with']['val_bpb']:.4f} "
              f"(paired difference {difference:+.4f})" if difference is not None else "")
    blurb = (f"Arm {arm} of an A/B ({ab.format_settings(plan.arm_settings(arm)) or 'the common settings'}), "
             f"{len(runs)} seeds, {ab.budget_text(plan)}; {ab.distinct(plan, 'device')}, dataset "
             f"{ab.distinct(plan, 'dataset')}. Mean {summaries[0]['export_label']} roundtrip val_bpb "
             f"{statistics.fmean(scores):.4f}{versus}.")
    return {
        "author": args.author, "github_id": args.github_id, "name": args.name or f"train_gpt_jepa {arm}",
        "blurb": blurb, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "track": track, "track_reason": track_reason,
        "val_loss": statistics.fmean(losses), "val_bpb": statistics.fmean(scores),
        "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "val_bpb_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "seeds": [run.seed for run in runs],
        "seed_results": {str(run.seed): seed_result(run) for run in runs},
        "bytes_total": max(s["artifact_bytes"] for s in summaries) + code_bytes, "bytes_code": code_bytes,
        "code_bytes_source": code_sizes,
        "score_line": summaries[0]["roundtrip_line"],
        "hardware": f"{summaries[0]['world_size']} x {ab.distinct(plan, 'device')}",
        "pytorch_version": ab.distinct(plan, "torch_version"),
        "dataset": ab.distinct(plan, "dataset"), "trainer_sha256": ab.distinct(plan, "code_sha256"),
        "arm": arm, "settings": settings, "budget": ab.budget_text(plan), "record_folder": record_folder, **comparison,
        **({"draft": True} if args.draft else {}),
    }


def seed_command(seed: int, world_size: int) -> str:
    launcher = (f"torchrun --standalone --nproc_per_node={world_size}" if world_size > 1 else "python3")
    return f"SEED={seed} {launcher} {RECORD_CODE_NAME}"


def render_readme(plan: ab.Plan, arm: str, runs: list[ab.Run], submission: dict[str, Any],
                  ab_command: str) -> str:
    """The folder's README: what the arm is, the command, the settings, the seeds, the budget,
    the comparison, the hardware and why the track is what it is."""
    world_size = runs[0].summary["world_size"]
    settings = submission["settings"]
    sizes = submission["code_bytes_source"]
    lines = [
        f"# {submission['name']}", "", submission["blurb"], "",
        f"**val_bpb {submission['val_bpb']:.4f}** (mean over seeds {', '.join(map(str, submission['seeds']))}, "
        f"std {submission['val_bpb_std']:.4f}; the `{submission['score_line']}` line of each log), "
        f"track `{submission['track']}`: {submission['track_reason']}.", "",
        "## What it is", "",
        (f"Arm `{arm}` of an A/B run by train_gpt_jepa's `scripts/ab.py`: "
         f"`{ab.format_settings(plan.arm_settings(arm)) or 'the common settings, unchanged'}` on top of the "
         f"common settings `{ab.format_settings(plan.common)}`."
         + (" It is the A/B's baseline." if arm == plan.baseline else "")), "",
        "## Run it", "",
        "From this folder, with the data and tokenizer where the settings below point (or DATA_PATH and "
        "TOKENIZER_PATH set):", "",
        *[f"    {seed_command(run.seed, world_size)}" for run in runs], "",
        (f"`{RECORD_CODE_NAME}` is train_gpt_jepa.py (sha256 `{submission['trainer_sha256']}`) with these settings "
         f"baked in as defaults (the environment still wins), docstrings and comments removed through the syntax "
         f"tree, and LZMA + base85 wrapped: {sizes['source']:,} bytes of source, {sizes['stripped']:,} stripped, "
         f"{sizes['wrapped']:,} as shipped. Each log opens with the source that ran."), "",
        "| setting | value |", "|---|---|",
        *[f"| `{name}` | `{value}` |" for name, value in settings.items()], "",
        "## Seeds", "",
        "| seed | val_loss | val_bpb | pre-quant val_bpb | steps | step_avg_ms | train s | artifact bytes | log |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        result = submission["seed_results"][str(run.seed)]
        lines.append(f"| {run.seed} | {result['val_loss']:.8f} | {result['val_bpb']:.8f} | "
                     f"{result['pre_quant_val_bpb']:.4f} | {result['steps']} | {result['step_avg_ms']:.1f} | "
                     f"{result['train_time_ms'] / 1000:.1f} | {result['artifact_bytes']:,} | "
                     f"[train_seed{run.seed}.log](train_seed{run.seed}.log) |")
    lines += [
        "", f"Submission size: the largest artifact plus `{RECORD_CODE_NAME}`, {submission['bytes_total']:,} bytes "
        f"({submission['bytes_code']:,} of code) of 16,000,000.", "",
        "## Budget and comparison", "", f"- budget: {submission['budget']}",
        f"- hardware: {submission['hardware']}, PyTorch {submission['pytorch_version']}",
        f"- dataset: {submission['dataset']}",
    ]
    if submission.get("compared_with"):
        other = submission["compared_with"]
        low, high = submission["val_bpb_difference_ci95"]
        ci = f", 95% CI [{low:+.4f}, {high:+.4f}]" if low is not None else ""
        p_value = submission["p_value"]
        lines.append(f"- against `{other['arm']}` ({ab.format_settings(other['settings'])}): mean val_bpb "
                     f"{other['val_bpb']:.4f}, paired difference {submission['val_bpb_difference']:+.4f}{ci}, "
                     f"one-sided p {'n/a' if p_value is None else format(p_value, '.3g')} "
                     f"({submission['p_value_note']})")
    lines += [f"- the A/B: `{ab_command}`", "",
              "## Check", "", "From a train_gpt_jepa checkout:", "",
              "    python3 scripts/check_record.py PATH_TO_THIS_FOLDER", ""]
    return "\n".join(lines)


# =============================================================================
# THE FOLDER
# =============================================================================


def git_config(key: str) -> str:
    try:
        result = subprocess.run(["git", "config", key], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def resolve_identity(args: argparse.Namespace) -> None:
    """Author and GitHub ID from the flags, else git config (user.name, github.user); a record
    without them is refused unless --draft, which marks it so."""
    args.author = args.author or git_config("user.name")
    args.github_id = args.github_id or git_config("github.user")
    missing = [flag for flag, value in (("--author", args.author), ("--github-id", args.github_id)) if not value]
    if missing and not args.draft:
        raise UserError(f"no {' or '.join(missing)}: pass it (or set git config user.name / github.user), "
                        f"or build a --draft")
    args.author, args.github_id = args.author or "unknown", args.github_id or "unknown"


def write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Every file into a temporary folder beside the target, then one rename: a folder is
    complete or absent."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--out {folder}: exists and is not an empty folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    for name, data in files.items():
        (staging / name).write_bytes(data)
    if folder.exists():
        folder.rmdir()
    os.replace(staging, folder)


def write_entry(entry: Path, folder: Path, runs: list[ab.Run]) -> None:
    """The project's own entry at the top level: its submission.json and, in logs/, exactly the
    train_seed<N>.log files it cites (older ones removed)."""
    logs = entry / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for stale in logs.glob("train_seed*.log"):
        stale.unlink()
    for run in runs:
        write_atomically(logs / f"train_seed{run.seed}.log", (folder / f"train_seed{run.seed}.log").read_bytes())
    write_atomically(entry / "submission.json", (folder / "submission.json").read_bytes())


def build_record(args: argparse.Namespace) -> Path:
    plan, ab_command = ab.load_plan(Path(args.ab))
    trainer_text = TRAINER_PATH.read_text(encoding="utf-8")
    runs = arm_runs(plan, args.arm, trainer_text)
    if not runs:
        raise UserError(f"--arm {args.arm}: no completed run in {args.ab}")
    resolve_identity(args)
    stripped = strip_source(trainer_text, baked_settings(runs[0]))
    name = args.name or f"train_gpt_jepa {args.arm}"
    code = stripped if args.no_wrap else wrap_source(stripped, name)
    sizes = {"source": len(trainer_text.encode("utf-8")), "stripped": len(stripped.encode("utf-8")),
             "wrapped": len(code.encode("utf-8"))}
    submission = build_submission(plan, args.arm, runs, args, sizes["wrapped"], sizes)
    packages = imported_packages(stripped)
    compressor = COMPRESSOR_MODULES.get(runs[0].config["compressor"])
    packages = sorted(set(packages) | ({compressor} if compressor else set()))
    files = {
        RECORD_CODE_NAME: code.encode("utf-8"),
        "submission.json": (json.dumps(submission, indent=2) + "\n").encode("utf-8"),
        "README.md": render_readme(plan, args.arm, runs, submission, ab_command).encode("utf-8"),
        "requirements.txt": ("\n".join(requirement_lines(packages)) + "\n").encode("utf-8"),
        **{f"train_seed{run.seed}.log": (plan.log_dir / f"{run.run_id}.txt").read_bytes() for run in runs},
    }
    folder = Path(args.out)
    write_folder(folder, files)
    if args.entry:
        write_entry(Path(args.entry), folder, runs)
    print(f"wrote {folder}: {RECORD_CODE_NAME} {sizes['wrapped']:,} bytes (source {sizes['source']:,}, stripped "
          f"{sizes['stripped']:,}), {len(runs)} seed logs, val_bpb {submission['val_bpb']:.4f}, "
          f"track {submission['track']}" + (f"; entry in {args.entry}" if args.entry else ""))
    return folder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build a record folder from one arm of an A/B.")
    parser.add_argument("--ab", required=True, metavar="AB_OUT", help="the --out folder of scripts/ab.py")
    parser.add_argument("--arm", required=True, help="the arm whose runs make the record")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="the record folder to write (new or empty)")
    parser.add_argument("--author", default="", help="default: git config user.name")
    parser.add_argument("--github-id", default="", help="default: git config github.user")
    parser.add_argument("--name", help="the submission's name (default: train_gpt_jepa ARM)")
    parser.add_argument("--draft", action="store_true", help="allow a missing author or GitHub ID (marked draft)")
    parser.add_argument("--no-wrap", action="store_true", help="ship the stripped source itself, not compressed")
    parser.add_argument("--entry", metavar="DIR", help="also write submission.json and logs/train_seed<N>.log "
                                                       "into DIR (the repository root: the project's own entry)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        build_record(args)
    except (UserError, ab.UserError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What an A/B run by scripts/ab.py reports: table.md (the arms and their settings, the step times
of an equal-compute budget, every arm's scores, the leaderboard against the baseline, every run)
and effects.json (the leaderboard's numbers, which effects.png draws).

Markdown goes through three small helpers (a table from a header and rows, a bullet list, blocks
joined by blank lines), so each section below says what it shows, not how markdown is spelled.
The descriptions of a plan (format_settings, distinct, budget_text) also serve scripts/make_record.py,
through ab.py.
"""

from __future__ import annotations

import datetime
import shlex
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ab_stats

if TYPE_CHECKING:  # for the signatures only: ab.py imports this module
    from ab import Plan

# =============================================================================
# MARKDOWN
# =============================================================================


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A pipe table: the header, its separator, one line per row (every row as long as the header)."""
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|---" * len(header) + "|", *lines[1:]])


def bullet_list(items: Iterable[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def markdown_document(blocks: Iterable[str]) -> str:
    """Headings, paragraphs, lists and tables, one blank line between two of them."""
    return "\n\n".join(blocks) + "\n"


# =============================================================================
# DESCRIBING A PLAN AND FORMATTING NUMBERS
# =============================================================================


def format_settings(settings: Mapping[str, str]) -> str:
    return " ".join(f"{name}={shlex.quote(value)}" for name, value in settings.items())


def distinct(plan: Plan, key: str) -> str:
    """The distinct values of one summary field over the completed runs (the device, say)."""
    values = sorted({str(run.summary.get(key)) for arm in plan.arms for run in plan.arm_runs(arm.name)})
    return ", ".join(values) or "—"


def budget_text(plan: Plan) -> str:
    if plan.budget == "steps":
        return f"steps: ITERATIONS={plan.common['ITERATIONS']} for every run, no wall-clock cap"
    if plan.budget == "compute":
        return (f"compute: baseline ITERATIONS={plan.common['ITERATIONS']}, every other arm "
                f"round(ITERATIONS x t_baseline / t_arm) from step times measured in one process; "
                f"no wall-clock cap")
    return (f"wall-clock: MAX_WALLCLOCK_SECONDS={plan.common['MAX_WALLCLOCK_SECONDS']} of training per run "
            f"(ITERATIONS={plan.common['ITERATIONS']} only as an upper bound)")


def format_mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def format_optional(value: float | None, pattern: str) -> str:
    return format(value, pattern) if value is not None else "—"


def format_ci(result: ab_stats.TestResult) -> str:
    return f"[{result.ci_low:+.4f}, {result.ci_high:+.4f}]" if result.ci_low is not None else "—"


# =============================================================================
# THE SECTIONS
# =============================================================================


def description(plan: Plan, command_line: str) -> list[str]:
    """The bullet points under the title: arms, settings, seeds, budget, where and how it ran."""
    items = []
    for arm in plan.arms:
        described = f"`{format_settings(arm.settings)}`" if arm.settings else "the common settings as they are"
        items.append(f"arm `{arm.name}`{' (baseline)' if arm.name == plan.baseline else ''}: {described}")
    shas = distinct(plan, "code_sha256")
    return items + [
        f"common settings: `{format_settings(plan.common)}`",
        f"seeds: {', '.join(map(str, plan.seeds))} (runs interleaved by seed; equal seeds share the initial "
        f"backbone and the batches)",
        f"budget: {budget_text(plan)}",
        f"device: {distinct(plan, 'device')}; processes per run: {distinct(plan, 'world_size')}",
        f"dataset: {distinct(plan, 'dataset')}",
        f"trainer sha256: {shas}" + (" (**runs from different trainer versions**)" if "," in shas else ""),
        f"command: `{command_line}`",
        (f"statistics (scipy): paired t test on per-seed differences (primary), Welch's test beside it, "
         f"Holm's correction across the {len(plan.arms) - 1} candidate arm(s); MDE: the smallest true difference "
         f"the paired test detects with {ab_stats.POWER:.0%} power at p < {ab_stats.SIGNIFICANCE_LEVEL}"),
        "pictures: [effects.png](effects.png) (paired differences, step-time cost; numbers in "
        "[effects.json](effects.json)), [curves.png](curves.png)",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
    ]


def step_times_section(plan: Plan) -> list[str]:
    """Under --budget compute: every arm's measured step time and the ITERATIONS it bought."""
    measurement = plan.step_times[plan.baseline]
    rows = []
    for arm in plan.arms:
        entry = plan.step_times[arm.name]
        rounds = entry.get("ratio_rounds") or []
        spread = f"{min(rounds):.3f} - {max(rounds):.3f}" if rounds and arm.name != plan.baseline else "—"
        rows.append([arm.name, f"{entry['step_ms']:.1f}", f"{entry['ratio']:.3f}", spread,
                     str(plan.iterations(arm.name))])
    return [
        "## Step times (equal compute)",
        (f"Measured in one process before the runs with `scripts/bench.py` (the real Trainer.step, "
         f"{measurement['steps']} steps x {measurement['rounds']} interleaved rounds; ratio: median over rounds of "
         f"the arm's time over the baseline's in the same round) on {measurement['device']}, "
         f"{measurement['measured_at']}; kept in [step_times.json](step_times.json)."),
        markdown_table(["arm", "step ms", "ratio to baseline", "per-round ratios (min - max)", "ITERATIONS"], rows),
    ]


def per_arm_section(plan: Plan) -> list[str]:
    rows = []
    for arm in plan.arms:
        runs = plan.arm_runs(arm.name)
        sliding = plan.arm_values(arm.name, "sliding_val_bpb")  # null when EVAL_STRIDE=0
        rows.append([
            arm.name, str(len(runs)),
            format_mean_std(plan.arm_values(arm.name, "roundtrip_val_bpb")),
            format_mean_std(plan.arm_values(arm.name, "val_bpb")),
            format_mean_std(sliding) if len(sliding) == len(runs) else "—",
            format_mean_std(plan.arm_values(arm.name, "steps"), 0),
            format_mean_std(plan.arm_values(arm.name, "step_avg_ms"), 1),
            f"{max(run.summary['total_bytes'] for run in runs):,}" if runs else "—",
            format_mean_std(plan.arm_values(arm.name, "mean_jepa_grad_share")),  # "—" for vanilla arms
        ])
    return [
        "## Per arm",
        ("Mean ± sample standard deviation over the seeds; total bytes: the largest (artifact + code); JEPA grad "
         "share: the run's mean over its log steps of ||g_JEPA|| / ||g_CE|| on the backbone matrices (— without JEPA)."),
        markdown_table(["arm", "n", "roundtrip val_bpb", "pre-quant val_bpb", "sliding val_bpb", "steps",
                        "step_avg_ms", "total bytes", "JEPA grad share"], rows),
    ]


def leaderboard_section(plan: Plan, comparisons: list[ab_stats.Comparison]) -> list[str]:
    rows = []
    for rank, c in enumerate(comparisons, start=1):
        welch = (f"{c.welch.difference:+.4f} ({format_optional(c.welch.p_one_sided, '.3g')})"
                 if c.welch.difference is not None else "—")
        rows.append([
            str(rank), c.arm, str(c.paired.n), format_optional(c.paired.difference, "+.4f"), format_ci(c.paired),
            format_optional(c.paired.p_one_sided, ".3g"), format_optional(c.p_holm, ".3g"), welch,
            format_optional(c.pre_quant.difference, "+.4f"), format_optional(c.mde, ".4f"),
            str(c.seeds_for_bar) if c.seeds_for_bar is not None else "—", c.verdict(),
        ])
    return [
        f"## Leaderboard against the baseline `{plan.baseline}` (roundtrip val_bpb, lower is better)",
        ("Paired difference = mean over common seeds of arm - baseline, its 95% CI and the one-sided p for "
         "H1: arm < baseline; Holm p adjusts that p across the candidate arms; Welch treats the arms as "
         f"independent samples. MDE: smallest true difference detectable at {ab_stats.POWER:.0%} power and "
         f"p < {ab_stats.SIGNIFICANCE_LEVEL} with these pairs' spread; seeds for "
         f"{ab_stats.CHALLENGE_EFFECT}: pairs that would detect the challenge's bar."),
        markdown_table(["rank", "arm", "pairs", "paired difference", "95% CI", "one-sided p", "Holm p",
                        "Welch difference (p)", "pre-quant difference", "MDE",
                        f"seeds for {ab_stats.CHALLENGE_EFFECT}", "verdict"], rows),
    ]


def runs_section(plan: Plan) -> list[str]:
    header = ["run", "arm", "seed", "outcome", "roundtrip val_bpb", "pre-quant val_bpb", "steps", "step_avg_ms",
              "train s", "total bytes"]
    rows = []
    for run in plan.runs:
        cells = [run.run_id, run.arm, str(run.seed), run.outcome]
        if run.outcome in ("reused", "ran"):
            summary = run.summary
            cells += [f"{summary['roundtrip_val_bpb']:.4f}", f"{summary['val_bpb']:.4f}", str(summary["steps"]),
                      f"{summary['step_avg_ms']:.1f}", f"{summary['train_time_ms'] / 1000:.1f}",
                      f"{summary['total_bytes']:,}"]
        rows.append(cells + ["—"] * (len(header) - len(cells)))  # a failed run has no scores
    return ["## Runs", markdown_table(header, rows)]


def notes(plan: Plan, failures: list[str]) -> list[str]:
    """What the reader must know before trusting the numbers above."""
    found = []
    if failures:
        found.append(f"{len(failures)} run(s) failed (--keep-going): the statistics use the completed runs only.")
    if plan.budget == "wallclock":
        found += [f"warning: {run.run_id} stopped at ITERATIONS={run.summary['steps']} before the wall-clock cap: "
                  f"the budget was not equal in time" for run in plan.runs
                  if run.summary and run.outcome != "failed" and run.summary["steps"] >= run.config["iterations"]]
    return found


def render_table(plan: Plan, command_line: str, failures: list[str], comparisons: list[ab_stats.Comparison]) -> str:
    blocks = [f"# A/B: {len(plan.arms) - 1} arm(s) against `{plan.baseline}`",
              bullet_list(description(plan, command_line))]
    if plan.step_times:
        blocks += step_times_section(plan)
    blocks += per_arm_section(plan) + leaderboard_section(plan, comparisons) + runs_section(plan)
    found = notes(plan, failures)
    if found:
        blocks.append(bullet_list(found))
    return markdown_document(blocks)


# =============================================================================
# EFFECTS.JSON
# =============================================================================


def effects_record(plan: Plan, comparisons: list[ab_stats.Comparison]) -> dict[str, Any]:
    """effects.json: exactly the numbers effects.png draws (and the leaderboard prints)."""
    return {
        "metric": "roundtrip_val_bpb", "baseline": plan.baseline,
        "baseline_settings": format_settings(plan.arm_settings(plan.baseline)),
        "budget": plan.budget, "budget_text": budget_text(plan), "dataset": distinct(plan, "dataset"),
        "device": distinct(plan, "device"), "trainer_sha256": distinct(plan, "code_sha256"),
        "significance_level": ab_stats.SIGNIFICANCE_LEVEL, "bar": -ab_stats.CHALLENGE_EFFECT,
        "baseline_iterations": plan.iterations(plan.baseline),
        "baseline_seeds": sorted(plan.seed_scores(plan.baseline)),
        "arms": [{
            "arm": c.arm, "settings": format_settings(plan.arm_settings(c.arm)), "n_pairs": c.paired.n,
            "difference": c.paired.difference, "ci_low": c.paired.ci_low, "ci_high": c.paired.ci_high,
            "p_one_sided": c.paired.p_one_sided, "p_holm": c.p_holm, "significant": c.significant,
            "welch_difference": c.welch.difference, "welch_p_one_sided": c.welch.p_one_sided,
            "seed_differences": {str(seed): value for seed, value in c.seed_differences.items()},
            "step_time_ratio": plan.step_times.get(c.arm, {}).get("ratio"), "iterations": plan.iterations(c.arm),
            "mde": c.mde, "seeds_for_bar": c.seeds_for_bar, "verdict": c.verdict(),
        } for c in comparisons],
    }

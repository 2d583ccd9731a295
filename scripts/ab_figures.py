"""Figures of an A/B (scripts/ab.py): effects.png, the leaderboard of paired differences against
the baseline beside each arm's step-time cost, and curves.png, the training curves of the best
few arms and the baseline.

ab.py computes every statistic; this module only draws the numbers it is handed (the `effects`
dict that ab.py also writes as effects.json, and each completed run's histories). The pure
helpers (effects_rows, curve_source, arms_to_draw, smooth, seed_mean_curve) decide what is
drawn, so the tests can check that the drawn numbers are exactly the given ones.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SAVE_DPI = 110
LABEL_WIDTH = 58  # characters per line of a row label: long settings strings wrap instead of clipping
SMOOTHING_WEIGHT = 0.6  # EMA weight for train-loss histories: one logged point is a single noisy batch
BASELINE_COLOUR = "black"


# =============================================================================
# WHAT IS DRAWN (pure)
# =============================================================================


def effects_rows(effects: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per row of effects.png, in the leaderboard's order (best first): exactly the
    numbers that are drawn. The drawing code reads nothing else from `effects`' arms."""
    level = effects.get("significance_level", 0.01)
    rows = []
    for arm in effects["arms"]:
        difference = arm.get("difference")
        has_ci = arm.get("n_pairs", 0) >= 2 and arm.get("ci_low") is not None and arm.get("ci_high") is not None
        ci = (arm["ci_low"], arm["ci_high"]) if has_ci else None
        # JSON keys are strings: order the seeds numerically so the dots are stable run to run.
        seeds = sorted(arm.get("seed_differences", {}).items(), key=lambda item: int(item[0]))
        if difference is None:
            detail = "no paired seed"
        elif ci is None:
            detail = f"Δ {difference:+.4f}, 1 seed: no CI"
        else:
            detail = f"Δ {difference:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}], {arm['n_pairs']} seeds"
            if arm.get("p_holm") is not None:
                detail += f", Holm p={arm['p_holm']:.2g}"
        if arm.get("significant"):
            detail += f", significant (Holm p<{level:g})"
        if arm.get("mde") is not None:
            detail += f", MDE {arm['mde']:.4f}"
        lines = [textwrap.fill(("* " if arm.get("significant") else "") + arm["arm"], LABEL_WIDTH)]
        settings = arm.get("settings", "")
        # The settings line only when the arm's name does not already spell them out.
        if settings and settings.lower().replace(" ", "+") != arm["arm"].lower():
            lines.append(textwrap.fill(settings, LABEL_WIDTH))
        rows.append({
            "arm": arm["arm"], "label": "\n".join(lines + [detail]),
            "difference": difference, "ci": ci, "seed_differences": [value for _, value in seeds],
            "significant": bool(arm.get("significant")), "step_time_ratio": arm.get("step_time_ratio"),
            "iterations": arm.get("iterations"), "cost_label": cost_label(arm),
        })
    return rows


def cost_label(arm: dict[str, Any]) -> str:
    ratio, iterations = arm.get("step_time_ratio"), arm.get("iterations")
    text = f"×{ratio:.3f}" if ratio is not None else "not measured"
    # On a second line: one line would run past the panel's edge for long ratios.
    return text + (f"\nITERATIONS={iterations}" if iterations is not None else "")


def curve_source(runs: Sequence[dict[str, Any]]) -> str:
    """"val" when most runs validated at >= 3 points during training, else "train" (the logged
    train loss) when any run has a train history; "val" again when nothing else exists."""
    validated = sum(1 for run in runs if len(run.get("val_history") or []) >= 3)
    if 2 * validated > len(runs):
        return "val"
    return "train" if any(run.get("train_history") for run in runs) else "val"


def arms_to_draw(effects: dict[str, Any], max_arms: int) -> list[str]:
    """The leaderboard's best `max_arms` arms (effects["arms"] is already sorted), then the baseline."""
    best = [arm["arm"] for arm in effects["arms"][:max(0, max_arms)]]
    return best + [effects["baseline"]]


def smooth(values: Sequence[float], weight: float = SMOOTHING_WEIGHT) -> np.ndarray:
    """Exponential moving average, bias-corrected so that the first points are not pulled to 0."""
    smoothed, average = np.empty(len(values)), 0.0
    for index, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        smoothed[index] = average / (1 - weight ** (index + 1))
    return smoothed


def seed_mean_curve(curves: Sequence[tuple[Sequence[float], Sequence[float]]]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over seeds of (x, y) curves with different x grids: each curve is
    interpolated linearly onto the union of all x values inside the range every curve covers
    (no extrapolation: a seed that stopped early must not be invented). Returns (x, mean, low, high)."""
    curves = [(np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in curves if len(x)]
    if not curves:
        empty = np.empty(0)
        return empty, empty, empty, empty
    start, stop = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[(grid >= start) & (grid <= stop)]
    stacked = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, stacked.mean(axis=0), stacked.min(axis=0), stacked.max(axis=0)


def step_time_ratios(effects: dict[str, Any]) -> dict[str, float | None]:
    """Each arm's step time relative to the baseline's (the baseline's is 1; None if not measured)."""
    return {effects["baseline"]: 1.0, **{arm["arm"]: arm.get("step_time_ratio") for arm in effects["arms"]}}


def second_axis(effects: dict[str, Any], arms: Sequence[str]) -> str:
    """The right-hand panel's x: "compute" (step x step-time ratio, in baseline steps) when every
    drawn arm's ratio was measured (--budget compute): the axis on which the arms' budgets end
    together. Training time otherwise; under compute it would show the machine's load instead."""
    ratios = step_time_ratios(effects)
    return "compute" if arms and all(ratios.get(arm) is not None for arm in arms) else "time"


def run_curve(run: dict[str, Any], source: str, axis: str, ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One run's (x, y): x is the step, the training time in seconds or the compute (step x the
    arm's step-time ratio), y is val_bpb or the smoothed train loss; sorted by x with duplicates
    dropped (np.interp needs increasing x)."""
    history = run.get("val_history" if source == "val" else "train_history") or []
    key = "val_bpb" if source == "val" else "train_loss"
    field = "train_time_ms" if axis == "time" else "step"
    points = [point for point in history if point.get(key) is not None and point.get(field) is not None]
    scale = {"step": 1.0, "compute": ratio, "time": 1 / 1000}[axis]
    x = np.array([point[field] * scale for point in points], dtype=float)
    y = np.array([point[key] for point in points], dtype=float)
    if source == "train":
        y = smooth(y)
    order = np.argsort(x, kind="stable")
    x, unique = np.unique(x[order], return_index=True)
    return x, y[order][unique]


def final_time_s(run: dict[str, Any]) -> float | None:
    if run.get("train_time_ms") is not None:
        return run["train_time_ms"] / 1000
    history = run.get("val_history") or run.get("train_history") or []
    return history[-1]["train_time_ms"] / 1000 if history else None


# =============================================================================
# DRAWING
# =============================================================================


def pyplot():
    import matplotlib  # here, not at import time: ab.py runs without matplotlib until it draws

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def effects_figure(effects: dict[str, Any]):
    """The effects.png figure, unsaved (the tests read its artists: each has a gid naming its arm)."""
    plt = pyplot()
    rows = effects_rows(effects)
    line_count = max([row["label"].count("\n") + 1 for row in rows] or [2])
    height = 2.6 + max(len(rows), 1) * (0.2 + 0.17 * line_count)  # grows with the arms: 16+ stay readable
    figure, (effect_axes, cost_axes) = plt.subplots(1, 2, sharey=True, figsize=(14, height), layout="constrained",
                                                    gridspec_kw={"width_ratios": [3, 1.2]})
    positions = np.arange(len(rows))
    for position, row in zip(positions, rows):
        if row["seed_differences"]:
            # Just below the row: the dots stay visible beside the mean's marker.
            effect_axes.plot(row["seed_differences"], [position + 0.22] * len(row["seed_differences"]), ".",
                             color="grey", markersize=5, gid=f"seeds:{row['arm']}")
        if row["difference"] is None:
            continue
        if row["ci"] is not None:
            effect_axes.plot(row["ci"], [position, position], "-", color="tab:blue", linewidth=2,
                             gid=f"ci:{row['arm']}")
        colour = "tab:green" if row["significant"] else "black"
        effect_axes.plot([row["difference"]], [position], "o", markersize=8, color=colour,
                         markerfacecolor=colour if row["significant"] else "white", gid=f"mean:{row['arm']}")
    effect_axes.axvline(0, color="grey", linewidth=1)
    effect_axes.axvline(effects["bar"], color="tab:red", linestyle="--", linewidth=1.2,
                        label=f"challenge bar ({effects['bar']:+g})", gid="bar")
    # Legend entries for the row artists, drawn once rather than per row.
    effect_axes.plot([], [], "o", color="black", markerfacecolor="white", label="mean paired difference")
    level = effects.get("significance_level", 0.01)
    effect_axes.plot([], [], "o", color="tab:green", label=f"significant (Holm p<{level:g})")
    effect_axes.plot([], [], "-", color="tab:blue", linewidth=2, label="95% CI")
    effect_axes.plot([], [], ".", color="grey", label="one seed's difference")
    # Above the panel, in rows narrow enough to stay within its width (beside the cost panel's title).
    effect_axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    effect_axes.set_xlabel(f"{effects['metric']}: arm − {effects['baseline']} (negative = better)")
    effect_axes.grid(axis="x", alpha=0.3)
    if rows:
        effect_axes.set_yticks(positions, [row["label"] for row in rows], fontsize=7.5)
        effect_axes.set_ylim(len(rows) - 0.5, -0.5)  # best on top
    else:
        effect_axes.set_yticks([])
        effect_axes.text(0.5, 0.5, "no arm besides the baseline", transform=effect_axes.transAxes, ha="center")
    draw_cost_panel(cost_axes, rows, positions)
    figure.suptitle(f"{effects['metric']} against the baseline {effects['baseline']}: mean of paired seed "
                    f"differences, leaderboard order (best on top)", fontsize=11)
    caption = (f"budget {effects.get('budget_text', effects.get('budget', '?'))}; "
               f"dataset {effects.get('dataset', '?')}; "
               f"{effects.get('device', '?')}; trainer sha256 {str(effects.get('trainer_sha256', '?'))[:12]}; "
               f"baseline {effects['baseline']} ({effects.get('baseline_settings') or 'common settings'})")
    figure.supxlabel(textwrap.fill(caption, 170), fontsize=8)
    return figure


def draw_cost_panel(axes, rows: list[dict[str, Any]], positions: np.ndarray) -> None:
    """The price of each gain on the same row: step time relative to the baseline's."""
    axes.set_title("cost: step time / baseline step time", fontsize=9)
    if not any(row["step_time_ratio"] is not None for row in rows):
        axes.text(0.5, 0.5, "step time not measured\n(--budget steps)", transform=axes.transAxes,
                  ha="center", va="center", fontsize=9)
        axes.set_xticks([])
        return
    largest = max(row["step_time_ratio"] for row in rows if row["step_time_ratio"] is not None)
    for position, row in zip(positions, rows):
        ratio = row["step_time_ratio"]
        if ratio is not None:
            axes.barh(position, ratio, height=0.5, color="tab:orange" if ratio > 1 else "tab:blue", alpha=0.7,
                      gid=f"cost:{row['arm']}")
        axes.text((ratio or 0) + largest * 0.02, position, row["cost_label"], va="center", fontsize=7)
    axes.axvline(1.0, color="grey", linewidth=1)
    axes.set_xlim(0, largest * 2.1)  # room for the text beside the longest bar
    axes.set_xlabel("step-time ratio (1 = baseline)")
    axes.grid(axis="x", alpha=0.3)


def write_effects_figure(effects: dict[str, Any], path: Path, dpi: int = SAVE_DPI) -> None:
    """effects.png: each arm's paired difference with its CI and seeds, beside its step-time cost."""
    figure = effects_figure(effects)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)


def curves_figure(effects: dict[str, Any], runs: Sequence[dict[str, Any]], max_arms: int = 4):
    """The curves.png figure, unsaved (each mean line's gid is "curve:<arm>:<axis>")."""
    plt = pyplot()
    arms = arms_to_draw(effects, max_arms)
    drawn_runs = [run for run in runs if run["arm"] in arms]
    source = curve_source(drawn_runs)
    colours = plt.get_cmap("tab10")
    figure, panels = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    axes_names = ("step", second_axis(effects, arms))
    ratios = step_time_ratios(effects)
    tails = {axis: [] for axis in axes_names}
    for index, arm in enumerate(arms):
        arm_runs = [run for run in drawn_runs if run["arm"] == arm]
        if not arm_runs:
            continue
        colour = BASELINE_COLOUR if arm == effects["baseline"] else colours(index % 10)
        score = np.mean([run["roundtrip_val_bpb"] for run in arm_runs])
        label = (f"{arm}{' (baseline)' if arm == effects['baseline'] else ''}: {len(arm_runs)} "
                 f"seed{'s' if len(arm_runs) > 1 else ''}, roundtrip {score:.4f}")
        for axes, axis in zip(panels, axes_names):
            ratio = ratios.get(arm) or 1.0
            x, mean, low, high = seed_mean_curve([run_curve(run, source, axis, ratio) for run in arm_runs])
            if len(x):
                axes.plot(x, mean, color=colour, linewidth=1.5, label=label, gid=f"curve:{arm}:{axis}",
                          marker="o" if source == "val" or len(x) == 1 else None, markersize=3)
                axes.fill_between(x, low, high, color=colour, alpha=0.15, linewidth=0)
                tails[axis].append(mean[x >= x[0] + 0.1 * (x[-1] - x[0])])
            if source == "val":
                # The score itself, in the same unit: the int6+lzma roundtrip of the final weights.
                finals = [final_time_s(run) if axis == "time" else run["steps"] * (ratio if axis == "compute" else 1)
                          for run in arm_runs]
                finals = [value for value in finals if value is not None]
                if finals:
                    axes.plot([np.mean(finals)], [score], "x", color=colour, markersize=8, markeredgewidth=2)
    what = "val_bpb" if source == "val" else f"train_loss (EMA-smoothed, weight {SMOOTHING_WEIGHT})"
    x_labels = {"step": "step (each arm's own schedule: compare the end points)",
                "compute": "compute: step x step-time ratio (baseline steps; the budgets end together)",
                "time": "training time (s)"}
    for axes, axis in zip(panels, axes_names):
        axes.set_xlabel(x_labels[axis])
        axes.set_ylabel(what)
        axes.grid(alpha=0.3)
        if source == "train" and tails[axis]:
            # The first steps' loss (~7 nats) would flatten the part where arms differ: skip the first 10%.
            tail = np.concatenate(tails[axis])
            if tail.size and np.ptp(tail) > 0:
                axes.set_ylim(tail.min() - 0.05 * np.ptp(tail), tail.max() + 0.1 * np.ptp(tail))
    if panels[0].get_legend_handles_labels()[0]:
        marker_note = "x: mean roundtrip at mean final step; " if source == "val" else ""
        panels[0].legend(title=f"arm ({marker_note}band: min-max over seeds)", fontsize=8, title_fontsize=8)
    else:
        panels[0].text(0.5, 0.5, "no run history to draw", transform=panels[0].transAxes, ha="center")
    others = len(effects["arms"])
    shown = (f"best {len(arms) - 1} of {others} arms + baseline" if others > len(arms) - 1
             else f"all {others} arm{'s' if others != 1 else ''} + baseline" if others else "baseline only")
    figure.suptitle(f"{what} during training, mean over seeds: {shown}; {effects.get('device', '?')}, "
                    f"dataset {effects.get('dataset', '?')}", fontsize=11)
    return figure


def write_curves_figure(effects: dict[str, Any], runs: list[dict[str, Any]], path: Path, max_arms: int = 4,
                        dpi: int = SAVE_DPI) -> None:
    """curves.png: validation curves when the runs validated during training, else smoothed
    train-loss histories; the best `max_arms` arms of the leaderboard and the baseline."""
    figure = curves_figure(effects, runs, max_arms)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)

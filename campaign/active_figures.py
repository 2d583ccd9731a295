"""The pictures of the second campaign (campaign/README.md, "Campaign 2") that scripts/ab.py
does not draw, from the committed summaries and effects.json alone:

- active/dose/dose_response.png: each arm's paired difference against vanilla (95% CI) as a
  function of the JEPA gradient share it actually had (the mean over its runs of
  mean_jepa_grad_share), for the annealed share sweep, constant strength and VICReg with a path;
- active/dose/share_trajectories.png: the measured share over training for each share arm
  (seed 1), which shows the ramp, the controller and the anneal;
- active/data_curve/data_curve.png: vanilla's validation curve when the first 32,768 training
  tokens repeat (12.5 epochs in 100 steps) beside the same run on all the data.

    python3 campaign/active_figures.py
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CAMPAIGN = Path(__file__).resolve().parent
ACTIVE = CAMPAIGN / "active"
SAVE_DPI = 110
# Arm families of the dose stage, by name.
FAMILIES = (
    ("share sweep (ramp and anneal on)", re.compile(r"^share(?P<share>[0-9.]+)$"), "tab:blue", "o"),
    ("constant strength (no ramp, no anneal)", re.compile(r"^const(?P<share>[0-9.]+)$"), "tab:orange", "s"),
    ("VICReg on the predictor (a path)", re.compile(r"^path(?P<share>[0-9.]+)$"), "tab:green", "^"),
)


def arm_summaries(stage: Path, tag: str, arm: str) -> list[dict[str, Any]]:
    """The completed summaries of one arm of an A/B, one per seed."""
    summaries = [json.loads(path.read_text(encoding="utf-8"))
                 for path in sorted((stage / "logs").glob(f"{tag}_{arm}_s*.json"))]
    return [summary for summary in summaries if summary.get("status") == "completed"]


def measured_share(stage: Path, tag: str, arm: str) -> float | None:
    """The arm's mean, over its seeds, of each run's mean JEPA gradient share."""
    shares = [summary["mean_jepa_grad_share"] for summary in arm_summaries(stage, tag, arm)
              if summary.get("mean_jepa_grad_share") is not None]
    return statistics.fmean(shares) if shares else None


def effect_points(stage: Path, tag: str) -> list[tuple[str, float, float, float, float]]:
    """(arm, measured share, paired difference, CI low, CI high) for every candidate arm."""
    effects = json.loads((stage / "effects.json").read_text(encoding="utf-8"))
    points = []
    for arm in effects["arms"]:
        share = measured_share(stage, tag, arm["arm"])
        if share is not None and arm.get("difference") is not None:
            points.append((arm["arm"], share, arm["difference"], arm["ci_low"], arm["ci_high"]))
    return points


def draw_points(axis: Any, points: list[tuple[str, float, float, float, float]], label: str, color: str,
                marker: str) -> None:
    points = sorted(points, key=lambda point: point[1])
    shares = [point[1] for point in points]
    differences = [point[2] for point in points]
    errors = [[point[2] - point[3] for point in points], [point[4] - point[2] for point in points]]
    axis.errorbar(shares, differences, yerr=errors, marker=marker, color=color, capsize=3, label=label)


def dose_response(path: Path) -> None:
    dose = ACTIVE / "dose"
    points = effect_points(dose, "dose")
    figure, axis = plt.subplots(figsize=(6.8, 4.2))
    for label, pattern, color, marker in FAMILIES:
        family = [point for point in points if pattern.match(point[0])]
        if family:
            draw_points(axis, family, label, color, marker)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("measured JEPA gradient share ||g_JEPA|| / ||g_CE|| (mean over log steps and seeds)")
    axis.set_ylabel("roundtrip val_bpb - vanilla (paired, 95% CI)")
    effects = json.loads((dose / "effects.json").read_text(encoding="utf-8"))
    axis.set_title(f"per step (100 steps), {len(effects['baseline_seeds'])} seeds, trainer "
                   f"{effects['trainer_sha256'][:8]}, local corpus", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=SAVE_DPI)
    plt.close(figure)


def share_trajectories(path: Path) -> None:
    dose = ACTIVE / "dose"
    figure, axis = plt.subplots(figsize=(6.8, 4.0))
    for label, pattern, color, _ in FAMILIES:
        arms = sorted({summary_path.stem.split("_")[1] for summary_path in (dose / "logs").glob("dose_*_s1.json")
                       if pattern.match(summary_path.stem.split("_")[1])})
        for index, arm in enumerate(arms):
            summaries = [summary for summary in arm_summaries(dose, "dose", arm) if summary["seed"] == 1]
            if not summaries:
                continue
            history = [entry for entry in summaries[0]["train_history"] if "jepa_grad_share" in entry]
            axis.plot([entry["step"] for entry in history], [entry["jepa_grad_share"] for entry in history],
                      color=color, alpha=0.4 + 0.6 * (index + 1) / len(arms), label=f"{arm} ({label.split(' (')[0]})")
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("measured JEPA gradient share")
    axis.set_title("the share each arm had over training (seed 1)", fontsize=9)
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=SAVE_DPI)
    plt.close(figure)


def data_curve(path: Path) -> None:
    logs = ACTIVE / "data_curve" / "logs"
    figure, axis = plt.subplots(figsize=(6.8, 4.0))
    for name, label, color in (("limited", "the first 32,768 tokens, repeated (TRAIN_MAX_TOKENS)", "tab:red"),
                               ("full", "all 677,590 training tokens (under one epoch)", "tab:blue")):
        summary = json.loads((logs / f"curve_vanilla_{name}.json").read_text(encoding="utf-8"))
        history = summary["val_history"]
        epochs = f", {summary['train_epochs']:.1f} epochs" if "train_epochs" in summary else ""
        axis.plot([entry["step"] for entry in history], [entry["val_bpb"] for entry in history], marker="o",
                  markersize=3, color=color, label=f"{label}{epochs}")
    axis.set_xlabel("step (4,096 tokens each)")
    axis.set_ylabel("val_bpb (vanilla)")
    axis.set_title(f"vanilla's validation curve, seed 1, trainer {summary['code_sha256'][:8]}, local corpus",
                   fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=SAVE_DPI)
    plt.close(figure)


def main() -> None:
    if (ACTIVE / "dose" / "effects.json").is_file():
        for name, draw in (("dose_response.png", dose_response), ("share_trajectories.png", share_trajectories)):
            draw(ACTIVE / "dose" / name)
            print(f"wrote {ACTIVE / 'dose' / name}")
    if (ACTIVE / "data_curve" / "logs" / "curve_vanilla_full.json").is_file():
        data_curve(ACTIVE / "data_curve" / "data_curve.png")
        print(f"wrote {ACTIVE / 'data_curve' / 'data_curve.png'}")


if __name__ == "__main__":
    main()

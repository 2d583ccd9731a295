"""The two pictures of campaign/README.md's campaign 1 (stages 0-3) that scripts/ab.py does not draw:

- stage0_budget_curve/budget_curve.png: the vanilla validation curve that set stage 1's budget
  (val_bpb every 20 steps of a 300-step run, constant learning rate until its warmdown at 240);
- stage1_screen/weight_sweep.png: stage 1's paired differences against vanilla (95% CIs) as a
  function of JEPA_WEIGHT, for the stop-gradient and the EMA target.

    python3 campaign/campaign_figures.py     # reads the committed summaries and effects.json
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CAMPAIGN = Path(__file__).resolve().parent
CURVE_SUMMARY = CAMPAIGN / "stage0_budget_curve" / "logs" / "curve_vanilla_b4096.json"
STAGE1_EFFECTS = CAMPAIGN / "stage1_screen" / "effects.json"
WEIGHT_ARM = re.compile(r"^w(?P<weight>[0-9.]+)_(?P<target>sg|ema)$")
CHOSEN_BUDGET = 100  # stage 1's baseline ITERATIONS
SAVE_DPI = 110


def budget_curve(path: Path) -> None:
    summary = json.loads(CURVE_SUMMARY.read_text(encoding="utf-8"))
    steps = [point["step"] for point in summary["val_history"]]
    bpb = [point["val_bpb"] for point in summary["val_history"]]
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    axis.plot(steps, bpb, marker="o", color="black")
    axis.axvline(CHOSEN_BUDGET, color="tab:blue", linestyle="--", label=f"stage 1 budget: {CHOSEN_BUDGET} steps")
    axis.axvspan(summary["steps"] - summary["config"]["warmdown_iters"], summary["steps"], color="0.9",
                 label="warmdown")
    axis.set_xlabel("step (4,096 tokens each)")
    axis.set_ylabel("val_bpb (local corpus, 64k tokens)")
    axis.set_title(f"vanilla PRESET=tiny, trainer {summary['code_sha256'][:8]}", fontsize=10)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=SAVE_DPI)
    plt.close(figure)


def weight_sweep(path: Path) -> None:
    effects = json.loads(STAGE1_EFFECTS.read_text(encoding="utf-8"))
    series: dict[str, list[tuple[float, float, float, float]]] = {"sg": [], "ema": []}
    for arm in effects["arms"]:
        match = WEIGHT_ARM.match(arm["arm"])
        if match and arm.get("difference") is not None:
            series[match["target"]].append((float(match["weight"]), arm["difference"], arm["ci_low"], arm["ci_high"]))
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    labels = {"sg": "stop-gradient target (TARGET_EMA_DECAY=0)", "ema": "EMA target (TARGET_EMA_DECAY=0.99)"}
    for offset, (target, points) in zip((0.97, 1.03), sorted(series.items(), reverse=True)):
        points.sort()
        weights = [point[0] * offset for point in points]
        differences = [point[1] for point in points]
        errors = [[point[1] - point[2] for point in points], [point[3] - point[1] for point in points]]
        axis.errorbar(weights, differences, yerr=errors, marker="o", capsize=3, label=labels[target])
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("JEPA_WEIGHT")
    axis.set_ylabel("val_bpb - vanilla (paired, 95% CI)")
    axis.set_title(f"stage 1 at equal compute, {effects['baseline_iterations']} vanilla steps, 2 seeds", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=SAVE_DPI)
    plt.close(figure)


def main() -> None:
    budget_curve(CAMPAIGN / "stage0_budget_curve" / "budget_curve.png")
    print(f"wrote {CAMPAIGN / 'stage0_budget_curve' / 'budget_curve.png'}")
    if STAGE1_EFFECTS.is_file():
        weight_sweep(CAMPAIGN / "stage1_screen" / "weight_sweep.png")
        print(f"wrote {CAMPAIGN / 'stage1_screen' / 'weight_sweep.png'}")


if __name__ == "__main__":
    main()

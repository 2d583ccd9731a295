"""The A/B figures, scripts/ab_figures.py: effects.png and curves.png written for 1, 3 and 12
arms with and without intermediate validation; the numbers drawn are the effects' own (read back
from the rows and from the matplotlib artists); validation vs train-loss curves chosen right; the
seed mean of curves on different grids checked by hand."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import ab_figures  # noqa: E402

pytest.importorskip("matplotlib")

TEST_DPI = 80  # fast; the figures' own default stays ab_figures.SAVE_DPI
SEEDS = (1, 2, 3)


def synthetic(arm_count: int, val_points: int, single_seed_arm: int | None = None,
              measured: bool = True) -> tuple[dict, list[dict]]:
    """An effects dict (leaderboard order) and the runs behind it, deterministic. Arm k improves
    on the baseline by k/1000 bpb; arm `single_seed_arm` ran one seed only; under the compute
    budget every arm has its own ITERATIONS, so step grids differ between arms."""
    generator = np.random.default_rng(0)
    names = [f"jepa_weight={0.01 * (index + 1):g}+target_ema_decay=0" for index in range(arm_count)]
    arms, runs = [], []
    for index, name in enumerate(["vanilla"] + names):
        seeds = SEEDS[:1] if index - 1 == single_seed_arm else SEEDS
        iterations = 300 if index == 0 else 300 - 4 * index
        for seed in seeds:
            final = 2.05 - 0.001 * index + 0.002 * generator.standard_normal()
            val_steps = np.linspace(iterations / val_points, iterations, val_points).round().astype(int)
            runs.append({
                "arm": name, "seed": seed, "steps": iterations, "roundtrip_val_bpb": final + 0.004,
                "val_history": [{"step": int(step), "train_time_ms": 14.0 * step, "val_loss": 3.5,
                                 "val_bpb": final + 1.5 * (1 - step / iterations)} for step in val_steps],
                "train_history": [{"step": step, "train_time_ms": 14.0 * step,
                                   "train_loss": 3.4 + 3.5 * np.exp(-step / 40) + 0.05 * generator.standard_normal()}
                                  for step in [1, 2, 3, 4, 5, *range(25, iterations + 1, 25)]],
            })
        if index == 0:
            continue
        differences = {str(seed): -0.001 * index + 0.003 * generator.standard_normal() for seed in seeds}
        mean = float(np.mean(list(differences.values())))
        several = len(seeds) >= 2
        arms.append({
            "arm": name, "settings": f"JEPA_WEIGHT={0.01 * index:g} TARGET_EMA_DECAY=0", "n_pairs": len(seeds),
            "difference": mean, "ci_low": mean - 0.006 if several else None,
            "ci_high": mean + 0.006 if several else None,
            "p_one_sided": 0.004 * index if several else None, "p_holm": 0.008 * index if several else None,
            "significant": several and index == 1, "seed_differences": differences,
            "step_time_ratio": 1 + 0.02 * index if measured else None,
            "iterations": iterations if measured else None, "mde": 0.012 if several else None,
        })
    arms.sort(key=lambda arm: arm["difference"])
    effects = {
        "metric": "roundtrip_val_bpb", "baseline": "vanilla", "baseline_settings": "JEPA_WEIGHT=0",
        "budget": "compute" if measured else "steps",
        "budget_text": "compute: baseline ITERATIONS=300, others scaled by measured step time",
        "dataset": "local_sp1024", "device": "cpu (2 cores, 2 torch threads)", "trainer_sha256": "3f5a" + "0" * 60,
        "significance_level": 0.01, "bar": -0.005, "baseline_iterations": 300, "arms": arms,
    }
    return effects, runs


def assert_png(path: Path, min_width: int, min_height: int, min_bytes: int) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= min_width and height >= min_height
    assert len(data) > min_bytes  # drawn panels, not an empty canvas
    return width, height


@pytest.mark.parametrize("arm_count", [1, 3, 12])
@pytest.mark.parametrize("val_points", [1, 5])
def test_figures_are_written(tmp_path, arm_count, val_points):
    effects, runs = synthetic(arm_count, val_points, single_seed_arm=0 if arm_count > 1 else None)
    ab_figures.write_effects_figure(effects, tmp_path / "effects.png", dpi=TEST_DPI)
    ab_figures.write_curves_figure(effects, runs, tmp_path / "curves.png", dpi=TEST_DPI)
    _, height = assert_png(tmp_path / "effects.png", 800, 250, 15_000)
    assert_png(tmp_path / "curves.png", 800, 300, 20_000)
    if arm_count == 12:  # the figure grows with the arms
        assert height > 12 * 0.5 * TEST_DPI


def test_effects_rows_are_the_effects_numbers():
    effects, _ = synthetic(3, 1, single_seed_arm=1)
    rows = ab_figures.effects_rows(effects)
    assert [row["arm"] for row in rows] == [arm["arm"] for arm in effects["arms"]]  # leaderboard order kept
    for row, arm in zip(rows, effects["arms"]):
        assert row["difference"] == arm["difference"]
        by_seed = sorted(map(int, arm["seed_differences"]))
        assert row["seed_differences"] == [arm["seed_differences"][str(seed)] for seed in by_seed]
        assert row["step_time_ratio"] == arm["step_time_ratio"] and row["significant"] == arm["significant"]
        assert str(arm["iterations"]) in row["cost_label"]
        if arm["n_pairs"] < 2:
            assert row["ci"] is None and "1 seed: no CI" in row["label"]
        else:
            assert row["ci"] == (arm["ci_low"], arm["ci_high"]) and "no CI" not in row["label"]
        assert ("Holm p<0.01" in row["label"]) == arm["significant"]
        assert row["label"].startswith("*") == arm["significant"]


def test_effects_figure_draws_those_numbers():
    from matplotlib.colors import to_rgba

    effects, _ = synthetic(3, 1, single_seed_arm=1)
    figure = ab_figures.effects_figure(effects)
    effect_axes, cost_axes = figure.axes
    by_gid = {line.get_gid(): line for line in effect_axes.get_lines() if line.get_gid()}
    labels = [tick.get_text() for tick in effect_axes.get_yticklabels()]
    for position, arm in enumerate(effects["arms"]):
        name = arm["arm"]
        assert list(by_gid[f"mean:{name}"].get_xdata()) == [arm["difference"]]
        assert list(by_gid[f"mean:{name}"].get_ydata()) == [position]
        assert sorted(by_gid[f"seeds:{name}"].get_xdata()) == sorted(arm["seed_differences"].values())
        if arm["n_pairs"] < 2:
            assert f"ci:{name}" not in by_gid and "1 seed: no CI" in labels[position]
        else:
            assert list(by_gid[f"ci:{name}"].get_xdata()) == [arm["ci_low"], arm["ci_high"]]
        # The significant arm's marker is filled, the others are open.
        filled = to_rgba(by_gid[f"mean:{name}"].get_markerfacecolor()) != to_rgba("white")
        assert filled == arm["significant"]
        bar = next(patch for patch in cost_axes.patches if patch.get_gid() == f"cost:{name}")
        assert bar.get_width() == pytest.approx(arm["step_time_ratio"])
    assert list(by_gid["bar"].get_xdata()) == [effects["bar"]] * 2
    assert effect_axes.get_ylim()[0] > effect_axes.get_ylim()[1]  # best on top
    ab_figures.pyplot().close(figure)


def test_effects_without_step_times_or_arms(tmp_path):
    effects, _ = synthetic(2, 1, measured=False)
    figure = ab_figures.effects_figure(effects)
    texts = [text.get_text().replace("\n", " ") for text in figure.axes[1].texts]
    assert any("step time not measured (--budget steps)" in text for text in texts)
    ab_figures.pyplot().close(figure)
    effects["arms"] = []
    ab_figures.write_effects_figure(effects, tmp_path / "effects.png", dpi=TEST_DPI)
    assert_png(tmp_path / "effects.png", 800, 200, 5_000)


def test_curve_source():
    def run(val_points: int, train_points: int = 4) -> dict:
        return {"val_history": [{"step": s, "train_time_ms": s, "val_bpb": 2.0} for s in range(1, val_points + 1)],
                "train_history": [{"step": s, "train_time_ms": s, "train_loss": 3.0}
                                  for s in range(1, train_points + 1)]}

    assert ab_figures.curve_source([run(5), run(3), run(1)]) == "val"  # most runs validated >= 3 times
    assert ab_figures.curve_source([run(5), run(1)]) == "train"  # half is not most
    assert ab_figures.curve_source([run(1), run(2)]) == "train"
    assert ab_figures.curve_source([run(1, 0), run(1, 0)]) == "val"  # no train history: the final points
    _, with_val = synthetic(3, 5)
    _, without_val = synthetic(3, 1)
    assert ab_figures.curve_source(with_val) == "val" and ab_figures.curve_source(without_val) == "train"


def test_arms_to_draw_and_the_drawn_curves():
    effects, runs = synthetic(12, 1)
    leaderboard = [arm["arm"] for arm in effects["arms"]]
    assert ab_figures.arms_to_draw(effects, 4) == leaderboard[:4] + ["vanilla"]
    assert ab_figures.arms_to_draw(effects, 20) == leaderboard + ["vanilla"]
    assert ab_figures.arms_to_draw({**effects, "arms": []}, 4) == ["vanilla"]
    figure = ab_figures.curves_figure(effects, runs, max_arms=4)
    drawn = {line.get_gid().split(":")[1] for axes in figure.axes for line in axes.get_lines()
             if (line.get_gid() or "").startswith("curve:")}
    assert drawn == set(leaderboard[:4]) | {"vanilla"} and len(drawn) <= 4 + 1
    assert "best 4 of 12 arms + baseline" in figure._suptitle.get_text()
    ab_figures.pyplot().close(figure)


def test_curves_use_the_compute_axis_when_step_times_were_measured():
    effects, runs = synthetic(3, 1)  # measured ratios 1, 1.02, 1.04 (see synthetic)
    arms = ab_figures.arms_to_draw(effects, 4)
    assert ab_figures.second_axis(effects, arms) == "compute"
    figure = ab_figures.curves_figure(effects, runs, max_arms=4)
    for arm in effects["arms"]:
        (line,) = [line for axes in figure.axes for line in axes.get_lines()
                   if line.get_gid() == f"curve:{arm['arm']}:compute"]
        arm_runs = [run for run in runs if run["arm"] == arm["arm"]]
        last_step = min(run["train_history"][-1]["step"] for run in arm_runs)
        assert line.get_xdata()[-1] == pytest.approx(last_step * arm["step_time_ratio"])
    ab_figures.pyplot().close(figure)
    unmeasured, _ = synthetic(3, 1, measured=False)
    assert ab_figures.second_axis(unmeasured, arms) == "time"


def test_seed_mean_curve_by_hand():
    # A: (0,1) (10,2) (20,3); B: (0,2) (5,2) (20,4) (30,9). Common range [0, 20] (B's 30 is beyond A's end),
    # grid = union inside it = 0, 5, 10, 20. A at 5 = 1.5; B at 10 = 2 + (5/15) * 2 = 8/3.
    x, mean, low, high = ab_figures.seed_mean_curve([([0, 10, 20], [1, 2, 3]), ([0, 5, 20, 30], [2, 2, 4, 9])])
    assert list(x) == [0, 5, 10, 20]
    assert mean == pytest.approx([1.5, 1.75, (2 + 8 / 3) / 2, 3.5])
    assert low == pytest.approx([1, 1.5, 2, 3]) and high == pytest.approx([2, 2, 8 / 3, 4])
    x, mean, low, high = ab_figures.seed_mean_curve([([7], [2.5])])  # one run, one point
    assert list(x) == [7] and list(mean) == [2.5]
    assert all(len(array) == 0 for array in ab_figures.seed_mean_curve([([], [])]))


def test_smooth():
    assert ab_figures.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull to 0
    # weight 0.5: averages 0.5, 0.25 + 1.5 = 1.75 -> corrected 0.5/0.5 = 1, 1.75/0.75 = 7/3
    assert ab_figures.smooth([1.0, 3.0], weight=0.5) == pytest.approx([1.0, 7 / 3])


def test_curves_survive_sparse_runs(tmp_path):
    effects, runs = synthetic(2, 1, single_seed_arm=0)
    runs[0]["train_history"] = []  # a run without logged train lines
    ab_figures.write_curves_figure(effects, runs, tmp_path / "curves.png", dpi=TEST_DPI)
    assert_png(tmp_path / "curves.png", 800, 300, 10_000)
    baseline_only = {**effects, "arms": []}
    ab_figures.write_curves_figure(baseline_only, [run for run in runs if run["arm"] == "vanilla"],
                                   tmp_path / "baseline.png", dpi=TEST_DPI)
    assert_png(tmp_path / "baseline.png", 800, 300, 10_000)
    ab_figures.write_curves_figure(baseline_only, [], tmp_path / "nothing.png", dpi=TEST_DPI)
    assert_png(tmp_path / "nothing.png", 800, 300, 5_000)

"""scripts/ab_stats.py: the paired and Welch t tests, Holm's adjustment and the paired test's power,
against hand-computed values (closed-form t CDFs at df = 2 and 4, printed t-table quantiles) and,
for the power, the normal approximation and a simulation."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from scipy import stats

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import ab_stats  # noqa: E402

# Five seeds whose scores spread by +/- 0.05 between seeds; the arm is 0.01-0.03 lower on every seed.
# Seed 7 only has a baseline run and seed 9 only an arm run: the paired test must ignore both.
BASELINE = {1: 1.20, 2: 1.30, 3: 1.25, 4: 1.22, 5: 1.28, 7: 1.50}
ARM = {1: 1.19, 2: 1.28, 3: 1.22, 4: 1.20, 5: 1.26, 9: 1.00}  # differences -0.01 -0.02 -0.03 -0.02 -0.02


# ---------------------------------------------------------------------------
# Paired t test
# ---------------------------------------------------------------------------


def test_paired_by_hand_df_4_on_common_seeds_only():
    # d = [-0.01, -0.02, -0.03, -0.02, -0.02]: mean -0.02, squared deviations 1e-4 + 0 + 1e-4 + 0 + 0
    # -> variance 2e-4 / 4 = 5e-5, sd = 0.0070711; se = sd / sqrt(5) = sqrt(1e-5) = 0.0031623;
    # t = -0.02 / 0.0031623 = -2 sqrt(10) = -6.324555, df = 4.
    # p = F_4(t) = 1/2 + 3/8 * t/sqrt(u) * (1 - t^2 / (12 u)), u = 1 + 40/4 = 11:
    #   = 1/2 - 3/8 * 2 sqrt(10/11) * (1 - 40/132) = 1/2 - 0.75 * sqrt(10/11) * 23/33 = 0.0015991
    # 95% CI: -0.02 -/+ t_{0.975, 4} * se = -0.02 -/+ 2.7764 * 0.0031623 = [-0.028780, -0.011220]
    result = ab_stats.paired_test(ARM, BASELINE)
    assert (result.kind, result.n, result.df, result.reason) == ("paired", 5, 4, "")
    assert result.difference == pytest.approx(-0.02)
    assert result.std_of_differences == pytest.approx(math.sqrt(5e-5))
    assert result.std_error == pytest.approx(math.sqrt(1e-5))
    assert result.t == pytest.approx(-2 * math.sqrt(10))
    assert result.p_one_sided == pytest.approx(0.5 - 0.75 * math.sqrt(10 / 11) * 23 / 33, rel=1e-9)
    assert result.p_one_sided == pytest.approx(0.0015991, abs=1e-7)
    assert result.ci_low == pytest.approx(-0.02 - 2.7764 * math.sqrt(1e-5), abs=1e-6)
    assert result.ci_high == pytest.approx(-0.02 + 2.7764 * math.sqrt(1e-5), abs=1e-6)


def test_paired_p_is_one_sided_with_n_minus_1_df():
    # Mutation check on the same data: a two-sided p would be 2 * 0.0015991 = 0.0031982, and df = n = 5
    # instead of 4 would give F_5(-6.3246) = 0.000728; neither matches the hand value 0.0015991.
    p = ab_stats.paired_test(ARM, BASELINE).p_one_sided
    assert p != pytest.approx(0.0031982, abs=1e-5)
    assert p != pytest.approx(0.000728, abs=1e-5)
    # Swapping the arms mirrors the test: H1 "baseline < arm" is then almost surely false.
    assert ab_stats.paired_test(BASELINE, ARM).p_one_sided == pytest.approx(1 - p)


def test_paired_by_hand_df_2():
    # d = [-0.01, -0.02, -0.03]: mean -0.02, sd 0.01, se = 0.01 / sqrt(3), t = -2 sqrt(3) = -3.464102.
    # p = F_2(t) = 1/2 + t / (2 sqrt(2 + t^2)) = 1/2 - 2 sqrt(3) / (2 sqrt(14)) = 1/2 - sqrt(3/14) = 0.037090
    # 95% CI: -0.02 -/+ t_{0.975, 2} * se = -0.02 -/+ 4.3027 * 0.0057735 = [-0.044841, 0.004841]
    result = ab_stats.paired_test({1: 1.19, 2: 1.28, 3: 1.27}, {1: 1.20, 2: 1.30, 3: 1.30})
    assert result.t == pytest.approx(-2 * math.sqrt(3))
    assert result.df == 2
    assert result.p_one_sided == pytest.approx(0.5 - math.sqrt(3 / 14), rel=1e-9)
    assert result.ci_low == pytest.approx(-0.02 - 4.3027 * 0.01 / math.sqrt(3), abs=1e-6)
    assert result.ci_high == pytest.approx(-0.02 + 4.3027 * 0.01 / math.sqrt(3), abs=1e-6)


def test_pairing_removes_the_shared_seed_effect():
    # The same five pairs as independent samples (Welch): arm [1.19 1.28 1.22 1.20 1.26] has mean 1.23,
    # variance (16 + 25 + 1 + 9 + 9)e-4 / 4 = 0.0015; baseline [1.20 1.30 1.25 1.22 1.28] mean 1.25,
    # variance (25 + 25 + 0 + 9 + 9)e-4 / 4 = 0.0017. se^2 = (0.0015 + 0.0017) / 5 = 0.00064, se = 0.0252982,
    # t = -0.02 / 0.0252982 = -0.790569; df ~ 8, where t_0.75 = 0.706 and t_0.80 = 0.889: 0.2 < p < 0.25.
    # The seed-to-seed spread (+/- 0.05) hides the 0.02 gain that the paired test finds at p = 0.0016.
    seeds = [1, 2, 3, 4, 5]
    welch = ab_stats.welch_test([ARM[seed] for seed in seeds], [BASELINE[seed] for seed in seeds])
    assert welch.std_error == pytest.approx(math.sqrt(0.00064))
    assert welch.t == pytest.approx(-0.790569, abs=1e-6)
    assert 0.2 < welch.p_one_sided < 0.25
    assert ab_stats.paired_test(ARM, BASELINE).p_one_sided < ab_stats.SIGNIFICANCE_LEVEL


def test_paired_without_enough_pairs_or_variance():
    none_common = ab_stats.paired_test({1: 1.0}, {2: 1.1})
    assert none_common.difference is None and none_common.n == 0
    assert none_common.reason == "no seed in common with the baseline"
    one_pair = ab_stats.paired_test({1: 1.0, 2: 5.0}, {1: 1.5, 3: 9.0})
    assert one_pair.difference == pytest.approx(-0.5) and one_pair.n == 1
    assert one_pair.p_one_sided is None and one_pair.ci_low is None and one_pair.std_of_differences is None
    assert "1 pair" in one_pair.reason and ">= 2 seeds" in one_pair.reason
    constant = ab_stats.paired_test({1: 1.0, 2: 2.0}, {1: 1.5, 2: 2.5})  # differences -0.5, -0.5
    assert constant.difference == pytest.approx(-0.5) and constant.std_of_differences == 0.0
    assert constant.p_one_sided is None and constant.ci_high is None and "zero variance" in constant.reason


# ---------------------------------------------------------------------------
# Welch (the hand examples of tests/test_ab.py)
# ---------------------------------------------------------------------------


def test_welch_equal_variances_by_hand():
    # a = [1, 2, 3], b = [3, 4, 5]: se^2 = 1/3 + 1/3 = 2/3, t = -2 / sqrt(2/3) = -sqrt(6), df = 4,
    # p = F_4(-sqrt 6) = 1/2 - 0.3 sqrt(2.4) = 0.035242; CI -2 -/+ 2.776445 * 0.816497 = [-4.266958, 0.266958]
    result = ab_stats.welch_test([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])
    assert (result.kind, result.n, result.reason) == ("welch", 3, "")
    assert result.difference == pytest.approx(-2.0)
    assert result.t == pytest.approx(-math.sqrt(6)) and result.df == pytest.approx(4.0)
    assert result.p_one_sided == pytest.approx(0.5 - 0.3 * math.sqrt(2.4), abs=1e-10)
    assert (result.ci_low, result.ci_high) == (pytest.approx(-4.266958, abs=1e-6), pytest.approx(0.266958, abs=1e-6))


def test_welch_unequal_variances_by_hand():
    # a = [1, 2, 3] (variance 1), b = [4, 6, 8] (variance 4): se^2 = 1/3 + 4/3 = 5/3,
    # t = -4 / sqrt(5/3) = -3.098387, df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = (25/9) / (17/18) = 50/17.
    result = ab_stats.welch_test([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
    assert result.t == pytest.approx(-4 / math.sqrt(5 / 3)) and result.df == pytest.approx(50 / 17)
    assert result.p_one_sided == pytest.approx(0.0273934, abs=1e-7)  # t_{50/17} CDF (scipy 1.17)
    assert result.ci_low == pytest.approx(-4 - 3.218759 * math.sqrt(5 / 3), abs=1e-5)
    assert result.ci_high == pytest.approx(-4 + 3.218759 * math.sqrt(5 / 3), abs=1e-5)


def test_welch_without_enough_seeds_or_variance():
    single = ab_stats.welch_test([1.0], [2.0, 3.0])
    assert single.difference == pytest.approx(-1.5) and single.n == 1
    assert single.p_one_sided is None and single.ci_low is None and ">= 2 seeds per arm" in single.reason
    constant = ab_stats.welch_test([1.0, 1.0], [1.0, 1.0])
    assert constant.p_one_sided is None and "zero variance" in constant.reason
    assert ab_stats.welch_test([], [1.0, 2.0]).difference is None


# ---------------------------------------------------------------------------
# Holm
# ---------------------------------------------------------------------------


def test_holm_by_hand():
    # Sorted 0.01, 0.03, 0.04 (m = 3): 3 * 0.01 = 0.03, 2 * 0.03 = 0.06, max(1 * 0.04, 0.06) = 0.06.
    assert ab_stats.holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # None is not a test (m = 3): 3 * 0.002 = 0.006, 2 * 0.4 = 0.8, max(1 * 0.5, 0.8) = 0.8.
    assert ab_stats.holm_adjust([None, 0.4, 0.002, None, 0.5]) == [None, pytest.approx(0.8), pytest.approx(0.006),
                                                                   None, pytest.approx(0.8)]
    # Capped at 1: 2 * 0.6 = 1.2 -> 1, and max(1 * 0.7, 1) = 1.
    assert ab_stats.holm_adjust([0.7, 0.6]) == [1.0, 1.0]
    assert ab_stats.holm_adjust([]) == [] and ab_stats.holm_adjust([None]) == [None]
    assert ab_stats.holm_adjust([0.02]) == [0.02]  # one test: nothing to adjust


def test_holm_is_monotone_and_never_below_the_raw_p():
    raw = [0.001, 0.2, 0.0105, 0.01, 0.04, 0.3]
    adjusted = ab_stats.holm_adjust(raw)
    by_raw = sorted(zip(raw, adjusted))
    assert all(low[1] <= high[1] for low, high in zip(by_raw, by_raw[1:]))
    assert all(p <= q <= 1.0 for p, q in zip(raw, adjusted))
    # 0.01 * 5 = 0.05 and 0.0105 * 4 = 0.042 -> the running maximum keeps 0.05 for the larger raw p.
    assert adjusted[2] == pytest.approx(0.05) and adjusted[3] == pytest.approx(0.05)


# ---------------------------------------------------------------------------
# Power of the paired test
# ---------------------------------------------------------------------------


def test_mde_has_the_requested_power():
    sd = 0.0041
    for n in (2, 3, 5, 10, 40):
        mde = ab_stats.minimum_detectable_difference(sd, n)
        t_critical = stats.t.ppf(0.99, n - 1)  # one-sided p < 0.01 with n - 1 df
        assert stats.nct.sf(t_critical, n - 1, mde * math.sqrt(n) / sd) == pytest.approx(0.80, abs=1e-9)
    # Mutation check: df = n instead of n - 1 (t_0.99,5 and nc on 5 df) would give 0.008077, not 0.008939.
    assert ab_stats.minimum_detectable_difference(sd, 5) == pytest.approx(0.008939, abs=1e-6)


def test_mde_power_by_simulation():
    # 40000 simulated A/Bs of 5 pairs whose true difference is -MDE: about 80% reach p < 0.01
    # (binomial standard error sqrt(0.8 * 0.2 / 40000) = 0.002).
    sd, n = 0.0041, 5
    mde = ab_stats.minimum_detectable_difference(sd, n)
    differences = np.random.default_rng(0).normal(-mde, sd, size=(40_000, n))
    t = differences.mean(axis=1) / (differences.std(axis=1, ddof=1) / math.sqrt(n))
    assert np.mean(t < -stats.t.ppf(0.99, n - 1)) == pytest.approx(0.80, abs=0.01)


def test_mde_approaches_the_normal_approximation_and_shrinks_like_one_over_sqrt_n():
    # Large n: (z_0.99 + z_0.80) * sd / sqrt(n) = (2.3263 + 0.8416) * 0.0041 / sqrt(200) = 0.00091844
    assert ab_stats.minimum_detectable_difference(0.0041, 200) == pytest.approx(
        (2.3263 + 0.8416) * 0.0041 / math.sqrt(200), rel=0.02)
    # Four times the pairs, about half the MDE (a little less: the t quantiles also shrink).
    ratio = ab_stats.minimum_detectable_difference(1.0, 400) / ab_stats.minimum_detectable_difference(1.0, 100)
    assert ratio == pytest.approx(0.5, rel=0.02) and ratio < 0.5
    mdes = [ab_stats.minimum_detectable_difference(1.0, n) for n in range(2, 30)]
    assert all(later < earlier for earlier, later in zip(mdes, mdes[1:]))
    # Proportional to the sd.
    unit_mde = ab_stats.minimum_detectable_difference(1.0, 7)
    assert ab_stats.minimum_detectable_difference(2.0, 7) == pytest.approx(2 * unit_mde)
    for sd, n in ((None, 5), (0.0, 5), (0.01, 1), (0.01, 0)):
        assert ab_stats.minimum_detectable_difference(sd, n) is None


def test_seeds_needed_is_the_first_n_that_detects_the_challenge_effect():
    for sd in (0.0041, 0.02):
        n = ab_stats.seeds_needed(sd)
        assert ab_stats.minimum_detectable_difference(sd, n) <= ab_stats.CHALLENGE_EFFECT
        assert ab_stats.minimum_detectable_difference(sd, n - 1) > ab_stats.CHALLENGE_EFFECT
    # Normal approximation: ((2.3263 + 0.8416) * 0.02 / 0.005)^2 = 160.6; the t test needs a few more.
    assert ab_stats.seeds_needed(0.02) == 164
    assert ab_stats.seeds_needed(0.0041) == 10
    # Tiny noise: MDE(2) = 0.0001 * 28.85 = 0.0029 <= 0.005 (df = 1: t_0.99,1 = 31.82 needs nc ~ 40.8),
    # so the fewest pairs that have a test at all; sd 0.001 needs 4 (MDE(3) = 0.00517 > 0.005).
    assert ab_stats.seeds_needed(0.0001) == 2
    assert ab_stats.seeds_needed(0.001) == 4
    assert ab_stats.seeds_needed(1.0) is None  # ~ (3.17 * 200)^2 = 400000 seeds > MAX_SEEDS
    assert ab_stats.seeds_needed(0.02, max_seeds=100) is None
    assert ab_stats.seeds_needed(None) is None and ab_stats.seeds_needed(0.0) is None


def test_describe_power():
    sentence = ab_stats.describe_power(0.0041, 3)
    expected_mde = f"{ab_stats.minimum_detectable_difference(0.0041, 3):.4f}"
    assert sentence == f"MDE {expected_mde} at 80% power, p < 0.01 (3 pairs, sd 0.0041); 0.005 needs 10 seeds"
    assert "needs >= 2 pairs" in ab_stats.describe_power(None, 1)
    assert "zero variance" in ab_stats.describe_power(0.0, 4)
    assert "more than 10000 seeds" in ab_stats.describe_power(1.0, 3)


def test_hand_written_t_tests_equal_scipys():
    """The t arithmetic stays in ab_stats (it also reports the standard error and the std of the
    differences the tables print); scipy's own tests must give the same t, df, p and interval."""
    generator = np.random.default_rng(7)
    for _ in range(50):
        seeds = range(int(generator.integers(2, 10)))
        baseline = {seed: 1.5 + float(generator.normal(0, 0.01)) for seed in seeds}
        arm = {seed: baseline[seed] + float(generator.normal(-0.002, 0.003)) for seed in seeds}
        ours = ab_stats.paired_test(arm, baseline)
        reference = stats.ttest_rel(list(arm.values()), list(baseline.values()), alternative="less")
        interval = stats.ttest_rel(list(arm.values()), list(baseline.values())).confidence_interval(0.95)
        assert ours.t == pytest.approx(reference.statistic, rel=1e-9)
        assert ours.p_one_sided == pytest.approx(reference.pvalue, rel=1e-9) and ours.df == reference.df
        assert (ours.ci_low, ours.ci_high) == pytest.approx((interval.low, interval.high), rel=1e-9, abs=1e-12)
        other = [1.5 + float(generator.normal(0, 0.02)) for _ in range(int(generator.integers(2, 10)))]
        ours = ab_stats.welch_test(list(arm.values()), other)
        reference = stats.ttest_ind(list(arm.values()), other, equal_var=False, alternative="less")
        assert ours.t == pytest.approx(reference.statistic, rel=1e-9)
        assert ours.p_one_sided == pytest.approx(reference.pvalue, rel=1e-9)
        assert ours.df == pytest.approx(reference.df, rel=1e-9)

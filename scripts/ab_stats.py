"""Statistics for scripts/ab.py: the paired and Welch t tests of "arm < baseline", Holm's
correction for comparing several arms with one baseline, the power of the paired test, and every
arm's comparison with the baseline, ranked as the leaderboard shows it.

Each run of an A/B gives one score (roundtrip val_bpb, lower is better). Arms run with the same
SEED share initial weights and data order, so most of the seed-to-seed spread is common to all
arms: the primary test is the paired t test on per-seed differences, which removes that shared
part. Welch's test (independent samples, unequal variances) is kept for arms whose seeds do not
match. The challenge accepts a claim at p < 0.01 (one-sided); with several arms against one
baseline, Holm's step-down adjustment keeps the family-wise error at that level. The power
functions answer "how small a difference could these seeds have shown?" and "how many seeds
would a 0.005 difference need?", with the exact noncentral t rather than a normal approximation,
because an A/B has few seeds. Every distribution comes from scipy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import optimize, stats

SIGNIFICANCE_LEVEL = 0.01  # the challenge's bar for a claim (p < 0.01)
CONFIDENCE = 0.95  # confidence intervals
POWER = 0.80  # for the minimum detectable difference
CHALLENGE_EFFECT = 0.005  # the effect size of interest (bpb / nats) for "seeds needed"
MAX_SEEDS = 10_000  # seeds_needed gives up (None) beyond this many seeds


@dataclass
class TestResult:
    """mean(arm) - mean(baseline) with a one-sided t test of H1: arm < baseline."""

    __test__ = False  # not a pytest test class, despite its name

    kind: str  # "paired" | "welch"
    difference: float | None  # mean difference arm - baseline (paired: mean of per-seed differences)
    n: int  # pairs (paired) or min(n_arm, n_baseline) (welch)
    std_error: float | None = None
    t: float | None = None
    df: float | None = None
    p_one_sided: float | None = None  # P(T <= t): small when arm is lower (better)
    ci_low: float | None = None  # two-sided CONFIDENCE interval of the difference
    ci_high: float | None = None
    std_of_differences: float | None = None  # paired only: sample std of the per-seed differences
    reason: str = ""  # why a field is None (one seed, zero variance, no common seed)


def _t_statistics(kind: str, difference: float, n: int, std_error: float, df: float,
                  std_of_differences: float | None = None) -> TestResult:
    """The t statistic, its one-sided p-value and the two-sided confidence interval."""
    t = difference / std_error
    half_width = float(stats.t.ppf(0.5 + CONFIDENCE / 2.0, df)) * std_error
    return TestResult(kind, difference, n, std_error, t, df, float(stats.t.cdf(t, df)),
                      difference - half_width, difference + half_width, std_of_differences)


def paired_test(arm: Mapping[int, float], baseline: Mapping[int, float]) -> TestResult:
    """Paired t test on the per-seed differences arm[seed] - baseline[seed], over the seeds both have."""
    common_seeds = sorted(set(arm) & set(baseline))
    pairs = len(common_seeds)
    if pairs == 0:
        return TestResult("paired", None, 0, reason="no seed in common with the baseline")
    differences = [arm[seed] - baseline[seed] for seed in common_seeds]
    mean_difference = statistics.fmean(differences)
    if pairs == 1:
        return TestResult("paired", mean_difference, 1, reason=(
            "no p-value: 1 pair; the paired test needs >= 2 seeds in common with the baseline "
            "(it estimates the spread of the differences from them)"))
    std_of_differences = statistics.stdev(differences)
    if std_of_differences == 0.0:
        return TestResult("paired", mean_difference, pairs, std_of_differences=0.0, reason=(
            "no p-value: every seed gave the same difference (zero variance)"))
    return _t_statistics("paired", mean_difference, pairs, std_of_differences / math.sqrt(pairs),
                         pairs - 1, std_of_differences)


def welch_test(arm: Sequence[float], baseline: Sequence[float]) -> TestResult:
    """Welch's unequal-variance t test; df from the Welch-Satterthwaite equation."""
    n_arm, n_baseline = len(arm), len(baseline)
    if n_arm == 0 or n_baseline == 0:
        return TestResult("welch", None, 0, reason="no completed run in one of the arms")
    difference = statistics.fmean(arm) - statistics.fmean(baseline)
    n = min(n_arm, n_baseline)
    if n < 2:
        return TestResult("welch", difference, n, reason=(
            f"no p-value: {n} seed in an arm; Welch's test needs >= 2 seeds per arm "
            f"(it estimates each arm's variance from its seeds)"))
    term_arm = statistics.variance(arm) / n_arm
    term_baseline = statistics.variance(baseline) / n_baseline
    variance_of_difference = term_arm + term_baseline
    if variance_of_difference == 0.0:
        return TestResult("welch", difference, n, reason=(
            "no p-value: every seed of both arms gave the same value (zero variance)"))
    df = variance_of_difference ** 2 / (term_arm ** 2 / (n_arm - 1) + term_baseline ** 2 / (n_baseline - 1))
    return _t_statistics("welch", difference, n, math.sqrt(variance_of_difference), df)


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    None entries (arms without a p-value) are not hypotheses tested, so they do not count in m.
    The k-th smallest p (k = 0, 1, ...) is multiplied by m - k; a running maximum keeps the
    adjusted values in the order of the raw ones, and they are capped at 1.
    """
    tested = sorted((p, index) for index, p in enumerate(p_values) if p is not None)
    m = len(tested)
    adjusted: list[float | None] = [None] * len(p_values)
    running_maximum = 0.0
    for rank, (p, index) in enumerate(tested):
        running_maximum = max(running_maximum, min(1.0, (m - rank) * p))
        adjusted[index] = running_maximum
    return adjusted


def _critical_t(n: int, alpha: float) -> float:
    """One-sided critical value of the paired t test with n pairs (n - 1 degrees of freedom)."""
    return float(stats.t.ppf(1.0 - alpha, n - 1))


def _power(effect: float, std_of_differences: float, n: int, alpha: float) -> float:
    """P(reject) of the one-sided paired t test with n pairs when the true mean difference is -effect."""
    noncentrality = effect * math.sqrt(n) / std_of_differences
    return float(stats.nct.sf(_critical_t(n, alpha), n - 1, noncentrality))


def minimum_detectable_difference(std_of_differences: float | None, n: int, alpha: float = SIGNIFICANCE_LEVEL,
                                  power: float = POWER) -> float | None:
    """The smallest true mean difference (positive) that the one-sided paired t test with n pairs
    at level alpha detects with the given power, for that std of the per-seed differences.

    Solved exactly with the noncentral t. None when n < 2 or the std is None or 0: with zero
    variance the t test itself is undefined (paired_test gives no p-value), so there is no power.
    """
    if n < 2 or std_of_differences is None or std_of_differences <= 0.0:
        return None
    critical_t, df = _critical_t(n, alpha), n - 1

    def power_gap(noncentrality: float) -> float:
        return float(stats.nct.sf(critical_t, df, noncentrality)) - power

    # Solve in noncentrality units (scale free): the power at 0 is alpha < power; double the upper
    # end until the power passes the target (df = 1 needs a noncentrality near 100).
    upper = max(1.0, critical_t + 2.0)
    while power_gap(upper) < 0.0:
        upper *= 2.0
    noncentrality = optimize.brentq(power_gap, 0.0, upper, xtol=1e-12, rtol=1e-14)
    return noncentrality * std_of_differences / math.sqrt(n)


def seeds_needed(std_of_differences: float | None, effect: float = CHALLENGE_EFFECT, alpha: float = SIGNIFICANCE_LEVEL,
                 power: float = POWER, max_seeds: int = MAX_SEEDS) -> int | None:
    """The smallest n >= 2 whose minimum detectable difference is <= effect, i.e. whose power at
    that effect is >= power. None when the std is None or 0 (as minimum_detectable_difference),
    and None when even max_seeds pairs are not enough.

    Power grows with n, so an exponential search brackets the answer and a bisection finds it,
    about 2 log2(n) power evaluations (one noncentral t each) instead of one per n.
    """
    if std_of_differences is None or std_of_differences <= 0.0 or max_seeds < 2:
        return None

    def enough(n: int) -> bool:
        return _power(effect, std_of_differences, n, alpha) >= power

    if not enough(max_seeds):
        return None
    too_few, sufficient = 1, 2  # invariant: too_few pairs fail (1 pair has no test), sufficient pairs pass
    while not enough(sufficient):
        too_few, sufficient = sufficient, min(2 * sufficient, max_seeds)
    while sufficient - too_few > 1:
        middle = (too_few + sufficient) // 2
        if enough(middle):
            sufficient = middle
        else:
            too_few = middle
    return sufficient


def describe_power(std_of_differences: float | None, n: int) -> str:
    """One short sentence: what these pairs could detect, and how many seeds CHALLENGE_EFFECT needs."""
    pairs = f"{n} pair{'s' if n != 1 else ''}"
    if n < 2 or std_of_differences is None:
        return f"no power estimate: needs >= 2 pairs ({pairs})"
    if std_of_differences == 0.0:
        return f"no power estimate: zero variance of the differences ({pairs})"
    detectable = minimum_detectable_difference(std_of_differences, n)
    needed = seeds_needed(std_of_differences)
    needed_text = f"{needed} seeds" if needed is not None else f"more than {MAX_SEEDS} seeds"
    return (f"MDE {detectable:.4f} at {POWER:.0%} power, p < {SIGNIFICANCE_LEVEL:g} "
            f"({pairs}, sd {std_of_differences:.4f}); {CHALLENGE_EFFECT:g} needs {needed_text}")


@dataclass
class Comparison:
    """One candidate arm against the baseline: the row of the leaderboard and of effects.json."""

    arm: str
    paired: TestResult  # the primary test: per-seed differences
    welch: TestResult  # beside it: the arms as independent samples
    pre_quant: TestResult  # paired, on the pre-quantisation val_bpb
    seed_differences: dict[int, float]
    p_holm: float | None = None  # Holm-adjusted across the candidate arms
    mde: float | None = None  # smallest difference these pairs detect (80% power, p < 0.01)
    seeds_for_bar: int | None = None  # pairs that would detect the challenge's 0.005

    @property
    def significant(self) -> bool:
        return (self.p_holm is not None and self.p_holm < SIGNIFICANCE_LEVEL
                and self.paired.difference is not None and self.paired.difference < 0)

    def verdict(self) -> str:
        result = self.paired
        if result.p_one_sided is None:
            return result.reason
        if self.significant:
            return f"beats the baseline (Holm p < {SIGNIFICANCE_LEVEL})"
        if 1.0 - result.p_one_sided < SIGNIFICANCE_LEVEL:
            return f"loses to the baseline (one-sided p < {SIGNIFICANCE_LEVEL} the other way, unadjusted)"
        return f"tie: not significant at p < {SIGNIFICANCE_LEVEL}"


def compare_with_baseline(scores: Mapping[str, Mapping[int, float]], pre_quant: Mapping[str, Mapping[int, float]],
                          baseline: str) -> list[Comparison]:
    """Every other arm's {seed: score} against the baseline's (and the same on the
    pre-quantisation score), Holm-adjusted across those arms and sorted as a leaderboard: by
    paired difference, best (most negative) first; arms without one last."""
    reference = scores[baseline]
    comparisons = []
    for arm, arm_scores in scores.items():
        if arm == baseline:
            continue
        paired = paired_test(arm_scores, reference)
        comparisons.append(Comparison(
            arm, paired, welch_test(list(arm_scores.values()), list(reference.values())),
            paired_test(pre_quant[arm], pre_quant[baseline]),
            {seed: arm_scores[seed] - reference[seed] for seed in sorted(arm_scores) if seed in reference},
            mde=minimum_detectable_difference(paired.std_of_differences, paired.n),
            seeds_for_bar=seeds_needed(paired.std_of_differences)))
    for comparison, adjusted in zip(comparisons, holm_adjust([c.paired.p_one_sided for c in comparisons])):
        comparison.p_holm = adjusted
    return sorted(comparisons, key=lambda c: (c.paired.difference is None, c.paired.difference or 0.0))

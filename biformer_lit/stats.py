"""Few-run statistics for comparing ablation arms: paired differences with a t interval, and a verdict.

Why a paired t interval and not a bootstrap: an ablation has a handful of seeds per arm (3 by default), and
with n = 3 a percentile bootstrap of the mean has at most 10 distinct resamples; its intervals are far too
narrow at such n (they cover the true difference much less often than they claim). rliable's stratified
bootstrap pools many tasks; here there is one task. Pairing by seed (the same seed gives the same data order
and, where shapes agree, the same initialisation) removes the seed-to-seed variation the arms share, and the
t interval is exact when the paired differences are roughly normal. Quantiles of Student's t come from its
CDF (the regularised incomplete beta function), so no SciPy is needed.
"""
import functools
import math
from dataclasses import dataclass
from statistics import mean, stdev
from typing import Dict, Optional

CONFIDENCE = 0.95
POWER = 0.80  # for "seeds needed": the chance that a rerun with that many seeds separates the difference
MAX_SEEDS = 1000


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom (bisection on the CDF)."""
    if not 0.001 <= p <= 0.999:
        raise ValueError(f"p={p}; allowed: [0.001, 0.999]")
    lo, hi = -1e4, 1e4  # |t| < 700 for df >= 1 at these p
    for _ in range(70):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2.0


def seeds_needed(difference: float, sd: float) -> Optional[int]:
    """About how many paired seeds a difference of this size needs, with this seed-to-seed spread of the paired
    differences, to be separated at CONFIDENCE with probability POWER: the smallest n with
    (t_{1-a/2, n-1} + t_{power, n-1}) * sd / sqrt(n) <= |difference|. None: no difference to separate."""
    if difference == 0.0:
        return None

    def enough(n: int) -> bool:  # the left side falls as n grows: a binary search finds the first n
        t = t_quantile(1 - (1 - CONFIDENCE) / 2, n - 1) + t_quantile(POWER, n - 1)
        return t * sd / math.sqrt(n) <= abs(difference)
    lo, hi = 2, MAX_SEEDS + 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid + 1, hi)
    return lo


@dataclass
class Contrast:
    """arm - reference over the seeds both have: mean difference, its CONFIDENCE interval (None for n < 2)."""
    n: int
    difference: float
    sd: Optional[float] = None
    low: Optional[float] = None
    high: Optional[float] = None

    @property
    def separable(self) -> Optional[bool]:
        """Whether the interval excludes 0; None when no interval can be given (n = 1)."""
        return None if self.low is None else self.low > 0 or self.high < 0

    @property
    def seeds_needed(self) -> Optional[int]:
        return None if self.sd is None or self.separable else seeds_needed(self.difference, self.sd)


def paired(reference: Dict[int, float], arm: Dict[int, float]) -> Optional[Contrast]:
    """The contrast arm - reference over their common seeds ({seed: value}); None when they share none."""
    seeds = sorted(set(reference) & set(arm))
    if not seeds:
        return None
    diffs = [arm[s] - reference[s] for s in seeds]
    if len(diffs) == 1:
        return Contrast(1, diffs[0])
    d, sd = mean(diffs), stdev(diffs)
    half = t_quantile(1 - (1 - CONFIDENCE) / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Contrast(len(diffs), d, sd, d - half, d + half)

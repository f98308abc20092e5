"""The clamped Poisson jitter (tenacity wait strategy) — statistical checks.

Every draw uses a seeded ``random.Random``, so these tests are deterministic: the
tolerances below are chosen so that a correct implementation passes for almost any seed
(false-alarm probability < 1e-6 per check), while a plausible wrong one (uniform draws
between the bounds, the unclamped exponential, Prefect's bounds mis-computed) fails.
"""
from __future__ import annotations

import math
import random

import pytest
import tenacity

from sync_worker.services import clamped_poisson_interval, wait_clamped_poisson

N = 10_000


def truncated_exponential(mean: float, lower: float, upper: float) -> tuple[float, float, object]:
    """Exact mean, standard deviation and CDF of Exp(mean) restricted to [lower, upper]."""
    lam = 1.0 / mean
    s_lo, s_hi = math.exp(-lam * lower), math.exp(-lam * upper)
    mass = s_lo - s_hi

    # E[X] and E[X^2] of the exponential over [lower, upper], normalised by its mass.
    def partial_moment(x: float, order: int) -> float:
        s = math.exp(-lam * x)
        if order == 1:
            return -s * (x + mean)
        return -s * (x * x + 2 * mean * x + 2 * mean * mean)

    m1 = (partial_moment(upper, 1) - partial_moment(lower, 1)) / mass
    m2 = (partial_moment(upper, 2) - partial_moment(lower, 2)) / mass

    def cdf(x: float) -> float:
        return (s_lo - math.exp(-lam * x)) / mass

    return m1, math.sqrt(m2 - m1 * m1), cdf


def prefect_lower_multiple(k: float) -> float:
    """Prefect's lower clamp multiple: equal mass between lower bound-median and median-upper."""
    return math.log2(2**k / (2**k - 1))


@pytest.mark.parametrize("r", [0.1, 0.3, 1.0])
def test_bounds_match_prefects_clamping(r: float) -> None:
    lower, upper = wait_clamped_poisson(clamping_factor=r).bounds(5.0)
    assert upper == pytest.approx(5.0 * (1 + r))
    assert lower == pytest.approx(5.0 * prefect_lower_multiple(1 + r), rel=1e-12)
    # ...which is always inside the documented interval*(1-r) bound.
    assert 5.0 * (1 - r) < lower < 5.0


@pytest.mark.parametrize(("r", "seed"), [(0.1, 1), (0.3, 20261123), (1.0, 7)])
def test_draws_stay_in_bounds_and_follow_the_clamped_exponential(r: float, seed: int) -> None:
    interval = 5.0
    wait = wait_clamped_poisson(clamping_factor=r, rng=random.Random(seed))
    draws = [wait.draw(interval) for _ in range(N)]
    lower, upper = wait.bounds(interval)

    # 1. Every draw within the documented open bounds, and within Prefect's exact ones.
    assert all(interval * (1 - r) < d < interval * (1 + r) for d in draws)
    assert all(lower <= d < upper for d in draws)

    # 2. The mean is the clamped distribution's exact mean, within 5 standard errors
    #    (sd/sqrt(N); r=0.3: sd ~0.8 s, SE ~0.008 s).
    exact_mean, sd, cdf = truncated_exponential(interval, lower, upper)
    sample_mean = sum(draws) / N
    assert abs(sample_mean - exact_mean) < 5 * sd / math.sqrt(N)

    # 3. ...and that exact mean is close to the interval: Prefect's lower bound is chosen
    #    to keep the average fixed; it drifts up slowly with r (+0.1% at r=0.3, +0.7% at 1).
    assert abs(exact_mean - interval) < 0.01 * interval

    # 4. The shape is the exponential's, not e.g. uniform between the bounds:
    #    Kolmogorov-Smirnov distance below the 0.1% critical value 1.95/sqrt(N).
    draws.sort()
    ks = max(max(cdf(d) - i / N, (i + 1) / N - cdf(d)) for i, d in enumerate(draws))
    assert ks < 1.95 / math.sqrt(N)


def test_mean_close_to_interval_at_prefects_default_factor() -> None:
    # Prefect's default clamping factor 0.3, through the Prefect-named helper.
    # Tolerance: 1% of the interval. The draws' sd is ~0.16 * interval, so the standard
    # error of 10,000 draws is ~0.0016 * interval: 1% is > 5 SE away even after the
    # 0.1% bias of the clamped distribution. A uniform draw between the same bounds would
    # average 1.026 * interval and fail.
    rng = random.Random(42)
    interval = 30.0
    draws = [clamped_poisson_interval(interval, rng=rng) for _ in range(N)]
    assert abs(sum(draws) / N - interval) < 0.01 * interval
    assert all(interval * 0.7 < d < interval * 1.3 for d in draws)


def test_seeded_draws_are_reproducible() -> None:
    a = wait_clamped_poisson(clamping_factor=0.3, rng=random.Random(5))
    b = wait_clamped_poisson(clamping_factor=0.3, rng=random.Random(5))
    assert [a.draw(1.0) for _ in range(100)] == [b.draw(1.0) for _ in range(100)]


def test_jitters_around_another_wait_strategy() -> None:
    # The backed-off interval is the mean: wait_exponential(attempt 3) = 4 * interval.
    wait = wait_clamped_poisson(tenacity.wait_exponential(multiplier=2, exp_base=2), 0.3, random.Random(3))
    state = tenacity.RetryCallState(tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = 3
    draws = [wait(state) for _ in range(2_000)]
    assert all(8 * 0.7 < d < 8 * 1.3 for d in draws)
    assert abs(sum(draws) / len(draws) - 8) < 0.08  # SE ~0.03 s


def test_is_a_tenacity_wait_usable_by_retrying() -> None:
    sleeps: list[float] = []
    attempts = []

    @tenacity.retry(
        wait=wait_clamped_poisson(0.5, 0.3, random.Random(11)),
        stop=tenacity.stop_after_attempt(5),
        sleep=sleeps.append,
        reraise=True,
    )
    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 5:
            raise ConnectionResetError
        return "done"

    assert flaky() == "done"
    assert len(sleeps) == 4
    assert all(0.35 < s < 0.65 for s in sleeps)
    assert len(set(sleeps)) == 4


@pytest.mark.parametrize("factor", [0, -0.1])
def test_non_positive_factor_is_rejected(factor: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        wait_clamped_poisson(clamping_factor=factor)


def test_zero_interval_gives_zero_sleep() -> None:
    assert clamped_poisson_interval(0.0, 0.3) == 0.0


def test_huge_factor_has_lower_bound_near_zero() -> None:
    # Prefect special-cases k >= 50 to avoid overflow; the formula here needs no special case.
    lower, upper = wait_clamped_poisson(clamping_factor=100).bounds(1.0)
    assert 0 <= lower < 1e-15 and upper == 101
    wait = wait_clamped_poisson(clamping_factor=100, rng=random.Random(1))
    draws = [wait.draw(1.0) for _ in range(1_000)]
    assert all(0 <= d < 101 for d in draws)
    assert abs(sum(draws) / len(draws) - 1.0) < 0.2  # ~the plain exponential: sd 1, SE 0.03

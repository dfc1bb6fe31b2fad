"""Tests for banyan_bus.retry: the schedule, the jitter and who gets retried."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import statistics
from typing import Any

import pytest

from banyan_bus.retry import RetryDecision, RetryPolicy


def rng(seed: int = 42) -> random.Random:
    return random.Random(seed)


# --------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------


def test_defaults() -> None:
    policy = RetryPolicy()
    assert policy == RetryPolicy.default()
    assert (policy.immediate, policy.delayed) == (0, 5)
    assert (policy.base, policy.factor, policy.cap, policy.jitter) == (1.0, 2.0, 300.0, 0.1)
    assert policy.retry_on == (Exception,)
    assert policy.dont_retry_on == ()
    assert policy.max_attempts == 6
    assert policy.delays() == (1.0, 2.0, 4.0, 8.0, 16.0)


def test_schedule_numbers() -> None:
    policy = RetryPolicy(delayed=4, base=0.5, factor=3.0, cap=100.0)
    assert policy.delays() == (0.5, 1.5, 4.5, 13.5)


def test_cap() -> None:
    policy = RetryPolicy(delayed=6, base=1.0, factor=10.0, cap=300.0)
    assert policy.delays() == (1.0, 10.0, 100.0, 300.0, 300.0, 300.0)


def test_factor_one_is_constant() -> None:
    assert RetryPolicy(delayed=3, base=7.0, factor=1.0, cap=7.0).delays() == (7.0, 7.0, 7.0)


def test_many_retries_do_not_overflow() -> None:
    policy = RetryPolicy(delayed=5_000, factor=10.0, cap=3_600.0, jitter=0)
    assert policy.delays()[-1] == 3_600.0
    assert policy.decide(5_000, ValueError()).delay_s == 3_600.0


def test_max_attempts() -> None:
    assert RetryPolicy(immediate=2, delayed=3).max_attempts == 6
    assert RetryPolicy.none().max_attempts == 1
    assert RetryPolicy.none().delays() == ()


# --------------------------------------------------------------------------
# decide: numbering
# --------------------------------------------------------------------------


def test_attempt_numbering() -> None:
    policy = RetryPolicy(immediate=2, delayed=3, jitter=0)
    actions = [policy.decide(n, ValueError("x")) for n in range(1, 8)]
    assert [d.action for d in actions] == [
        "retry_now",
        "retry_now",
        "retry_later",
        "retry_later",
        "retry_later",
        "dead_letter",
        "dead_letter",  # beyond max_attempts (policy shortened in flight): still exhausted
    ]
    assert [d.delay_s for d in actions] == [0.0, 0.0, 1.0, 2.0, 4.0, 0.0, 0.0]


def test_default_policy_walkthrough() -> None:
    policy = RetryPolicy(jitter=0)
    decisions = [policy.decide(n, ValueError()) for n in range(1, 7)]
    assert [d.action for d in decisions[:5]] == ["retry_later"] * 5
    assert [d.delay_s for d in decisions[:5]] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert decisions[5] == RetryDecision(
        "dead_letter", 0.0, "retries exhausted after 6 attempts (ValueError)"
    )


def test_immediate_only() -> None:
    policy = RetryPolicy(immediate=3, delayed=0)
    assert [policy.decide(n, OSError()).action for n in (1, 2, 3, 4)] == [
        "retry_now",
        "retry_now",
        "retry_now",
        "dead_letter",
    ]


def test_none_dead_letters_first_failure() -> None:
    decision = RetryPolicy.none().decide(1, ValueError("boom"))
    assert decision == RetryDecision(
        "dead_letter", 0.0, "retries exhausted after 1 attempt (ValueError)"
    )


@pytest.mark.parametrize("attempt", [0, -1, True, 1.0, "1"])
def test_attempt_must_be_positive_int(attempt: Any) -> None:
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy().decide(attempt, ValueError())


def test_reasons() -> None:
    policy = RetryPolicy(immediate=1, delayed=5)
    now = policy.decide(1, KeyError("k"))
    assert now.reason == "attempt 1 of 7 failed (KeyError); retrying now"
    later = policy.decide(4, KeyError("k"), rng=rng())
    assert re.fullmatch(r"attempt 4 of 7 failed \(KeyError\); retrying in \d+\.\d s", later.reason)
    assert f"{later.delay_s:.1f} s" in later.reason


# --------------------------------------------------------------------------
# decide: jitter
# --------------------------------------------------------------------------


def test_no_jitter_is_exact() -> None:
    policy = RetryPolicy(jitter=0)
    for k, nominal in enumerate(policy.delays(), start=1):
        assert policy.decide(k, ValueError(), rng=rng(k)).delay_s == nominal


@pytest.mark.parametrize("jitter", [0.1, 0.5, 1.0])
def test_jitter_bounds_over_many_samples(jitter: float) -> None:
    policy = RetryPolicy(delayed=5, jitter=jitter)
    r = rng(7)
    for k, nominal in enumerate(policy.delays(), start=1):
        samples = [policy.decide(k, ValueError(), rng=r).delay_s for _ in range(2_000)]
        low = nominal * (1 - jitter)
        assert all(low < s <= nominal for s in samples)
        assert all(s > 0 for s in samples)
        # spread over the whole band, centred where a uniform draw puts it
        span = nominal * jitter
        assert min(samples) < low + 0.05 * span
        assert max(samples) > nominal - 0.05 * span
        standard_error = span / (12 * len(samples)) ** 0.5
        expected_mean = nominal * (1 - jitter / 2)
        assert statistics.fmean(samples) == pytest.approx(expected_mean, abs=5 * standard_error)


def test_jitter_never_exceeds_cap() -> None:
    policy = RetryPolicy(delayed=10, base=10.0, factor=4.0, cap=60.0, jitter=0.3)
    r = rng(3)
    for k in range(1, 11):
        for _ in range(200):
            assert policy.decide(k, ValueError(), rng=r).delay_s <= 60.0


def test_jitter_is_reproducible_with_a_seed() -> None:
    policy = RetryPolicy()
    first = [policy.decide(k, ValueError(), rng=rng(1)).delay_s for k in range(1, 6)]
    again = [policy.decide(k, ValueError(), rng=rng(1)).delay_s for k in range(1, 6)]
    other = [policy.decide(k, ValueError(), rng=rng(2)).delay_s for k in range(1, 6)]
    assert first == again
    assert first != other


def test_default_rng_stays_in_bounds() -> None:
    policy = RetryPolicy()
    for _ in range(100):
        delay = policy.decide(3, ValueError()).delay_s
        assert 3.6 < delay <= 4.0


# --------------------------------------------------------------------------
# decide: which exceptions
# --------------------------------------------------------------------------


def test_retry_on_and_dont_retry_on_precedence() -> None:
    policy = RetryPolicy(retry_on=(OSError,), dont_retry_on=(ConnectionRefusedError,))
    assert policy.decide(1, OSError()).action == "retry_later"
    assert policy.decide(1, ConnectionResetError()).action == "retry_later"  # subclass
    refused = policy.decide(1, ConnectionRefusedError())
    assert refused == RetryDecision(
        "dead_letter", 0.0, "ConnectionRefusedError is in dont_retry_on"
    )
    other = policy.decide(1, ValueError())
    assert other == RetryDecision("dead_letter", 0.0, "ValueError is not in retry_on (OSError,)")


def test_dont_retry_on_wins_over_an_exact_retry_on() -> None:
    policy = RetryPolicy(retry_on=(ValueError,), dont_retry_on=(ValueError,))
    assert policy.decide(1, ValueError()).reason == "ValueError is in dont_retry_on"


def test_dont_retry_on_dead_letters_even_with_retries_left() -> None:
    policy = RetryPolicy(immediate=3, dont_retry_on=(KeyError,))
    assert policy.decide(1, KeyError()).action == "dead_letter"
    assert policy.decide(1, IndexError()).action == "retry_now"


def test_timeouts_are_retried_like_failures() -> None:
    assert RetryPolicy().decide(1, TimeoutError()).action == "retry_later"
    assert (
        RetryPolicy(dont_retry_on=(TimeoutError,)).decide(1, TimeoutError()).action == "dead_letter"
    )


@pytest.mark.parametrize(
    "exc", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1), GeneratorExit()]
)
@pytest.mark.parametrize("retry_on", [(Exception,), (BaseException,)])
def test_base_exceptions_are_never_retried(
    exc: BaseException, retry_on: tuple[type[BaseException], ...]
) -> None:
    decision = RetryPolicy(immediate=2, retry_on=retry_on).decide(1, exc)
    assert decision.action == "dead_letter"
    assert "never retried" in decision.reason


def test_single_class_and_list_are_normalised() -> None:
    policy = RetryPolicy(retry_on=OSError, dont_retry_on=[KeyError])  # type: ignore[arg-type]
    assert policy.retry_on == (OSError,)
    assert policy.dont_retry_on == (KeyError,)
    hash(policy)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("immediate", -1),
        ("immediate", 1.5),
        ("immediate", True),
        ("delayed", -1),
        ("delayed", "5"),
        ("base", 0),
        ("base", -1.0),
        ("base", float("nan")),
        ("factor", 0.5),
        ("factor", float("inf")),
        ("jitter", -0.1),
        ("jitter", 1.1),
        ("jitter", float("nan")),
        ("cap", 0.5),  # below base
        ("cap", float("inf")),
        ("cap", 366 * 86_400 + 1),  # longer than any delay can be
        ("retry_on", ("ValueError",)),
        ("retry_on", (int,)),
        ("retry_on", None),
        ("dont_retry_on", (object,)),
    ],
)
def test_validation_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**{field: value})


def test_boundaries_that_are_valid() -> None:
    RetryPolicy(immediate=0, delayed=0)
    RetryPolicy(factor=1.0, jitter=0.0)
    RetryPolicy(jitter=1.0)
    RetryPolicy(base=5.0, cap=5.0)
    RetryPolicy(cap=366 * 86_400)
    RetryPolicy(base=1, factor=2, cap=10)  # ints are fine


# --------------------------------------------------------------------------
# Value semantics
# --------------------------------------------------------------------------


def test_frozen() -> None:
    policy = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.delayed = 3  # type: ignore[misc]
    decision = policy.decide(1, ValueError())
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.action = "retry_now"  # type: ignore[misc]


def test_repr() -> None:
    assert repr(RetryPolicy()) == (
        "RetryPolicy(immediate=0, delayed=5, base=1.0, factor=2.0, cap=300.0, "
        "jitter=0.1, retry_on=(Exception,), dont_retry_on=())"
    )
    assert repr(RetryPolicy(retry_on=(OSError, TimeoutError), dont_retry_on=(KeyError,))) == (
        "RetryPolicy(immediate=0, delayed=5, base=1.0, factor=2.0, cap=300.0, "
        "jitter=0.1, retry_on=(OSError, TimeoutError), dont_retry_on=(KeyError,))"
    )

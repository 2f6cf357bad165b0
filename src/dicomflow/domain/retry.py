"""Cloud Tasks' retry semantics, as pure functions.

The same `RetryPolicy` drives the local queue's backoff and the worker's "is this the last attempt?"
decision. In the cloud its values come from the environment that Terraform sets from the very variable
it uses for the queue's RetryConfig, so the two cannot drift (DESIGN.md invariant 5; a test compares
`infra/` with the defaults below).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from dicomflow.domain.failures import Failure


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Mirror of google.cloud.tasks_v2.RetryConfig (max_retry_duration is left unlimited)."""

    max_attempts: int = 5
    min_backoff_seconds: float = 10.0
    max_backoff_seconds: float = 600.0
    max_doublings: int = 4

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1: an unlimited queue would never dead-letter")
        if self.min_backoff_seconds < 0 or self.max_backoff_seconds < self.min_backoff_seconds:
            raise ValueError("need 0 <= min_backoff_seconds <= max_backoff_seconds")
        if self.max_doublings < 0:
            raise ValueError("max_doublings must be >= 0")

    def backoff(self, retry_count: int) -> float:
        """Delay before the retry that follows attempt number `retry_count` (0 = first attempt).

        Cloud Tasks doubles the interval `max_doublings` times starting from `min_backoff`, then grows it
        linearly by 2**max_doublings * min_backoff, capped at `max_backoff`
        (google/cloud/tasks_v2/types/queue.py, RetryConfig.max_doublings: 10s, 20s, 40s, 80s, 160s, 240s, ...).
        """
        if retry_count < 0:
            raise ValueError("retry_count must be >= 0")
        step = self.min_backoff_seconds * 2**self.max_doublings
        if retry_count <= self.max_doublings:
            delay = self.min_backoff_seconds * 2**retry_count
        else:
            delay = step * (1 + retry_count - self.max_doublings)
        return float(min(delay, self.max_backoff_seconds))

    def is_last_attempt(self, retry_count: int) -> bool:
        """True when the queue will not deliver the task again after this attempt.

        `retry_count` is `X-CloudTasks-TaskRetryCount`: 0 on the first attempt.
        """
        return retry_count + 1 >= self.max_attempts


class Verdict(StrEnum):
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


def decide(failure: Failure, retry_count: int, policy: RetryPolicy) -> Verdict:
    """Invariant 4: never retry a permanent failure, never dead-letter a transient one early."""
    if failure.permanent or policy.is_last_attempt(retry_count):
        return Verdict.DEAD_LETTER
    return Verdict.RETRY


# Retry settings of the expand, changes and dead-letter queues. Their handlers are short and
# idempotent, so they retry more often and sooner than conversions; infra/queues.tf uses the same
# numbers (tests/infra compares them).
CONTROL_POLICY = RetryPolicy(max_attempts=10, min_backoff_seconds=5.0, max_backoff_seconds=300.0, max_doublings=5)

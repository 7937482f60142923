"""The store's one retry policy: how many attempts, how long between them, what is retried.

Every S3 request is retried under it, in one of three places:

- botocore's own retries (listings, HEADs, writes, and GETs when a proxy applies):
  "standard" mode, its attempts from here (`botocore_config`). botocore times
  its waits itself, with full jitter and the same 20 s cap.
- the lean ranged GET (`store.rangeget`): a network error, or a response whose
  status is in `RETRY_STATUSES`, is sent again (`retryable_status`).
- a GET whose response was not what was asked for, or whose body was cut
  half-way (`S3Store.iter_range`): asked again from the first piece not yet
  delivered (`retryable`: a `TransientError`, once a response has begun).

Our two loops each count their own attempts, the first included, against
``max_attempts`` (``s3_max_attempts`` of the mount, and so does botocore, see
`botocore_config`) and wait `backoff` between two of them.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from s3cachefs.base.errors import StoreError, TransientError

if TYPE_CHECKING:
    import botocore.config

    from s3cachefs.base.config import MountConfig

# Statuses worth another attempt: throttling and server-side trouble.
RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})

# One backoff for both loops of ours: full jitter over 0.1 s doubling per attempt,
# capped at 20 s (the lean GET's, which botocore's "standard" mode also caps at 20 s).
# Chosen over the body loop's former 50 ms base capped at 2 s: that loop also meets
# throttled or overloaded servers (bodies cut under load), and a 2 s cap keeps a
# throttled server busy when --s3-max-attempts is raised; at the default 3 attempts
# the waits stay short (at most 0.2 s, then 0.4 s), which a FUSE read waits for.
BACKOFF_BASE: Final = 0.1
BACKOFF_CAP: Final = 20.0


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts a request gets (the first included), and the wait between two."""

    max_attempts: int

    @classmethod
    def from_config(cls, config: MountConfig) -> RetryPolicy:
        return cls(max_attempts=config.s3_max_attempts)

    def botocore_config(self) -> botocore.config.Config:
        """botocore's own retries: "standard" mode, the same attempts in all as ours.

        Stated as ``total_max_attempts``: botocore's ``max_attempts`` counts the
        retries after the first request, which gave botocore's requests one attempt
        more than `--s3-max-attempts` ("tries of one S3 request") says.
        """
        import botocore.config  # here: the bulk worker uses this policy without botocore

        return botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": self.max_attempts}
        )

    def again(self, attempts: int) -> bool:
        """Whether another attempt may follow the ``attempts`` made so far."""
        return attempts < self.max_attempts

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed ones: full jitter, exponential, capped."""
        return random.random() * min(BACKOFF_CAP, BACKOFF_BASE * 2.0**attempts)  # noqa: S311

    def wait(self, attempts: int) -> None:
        """Sleep `backoff` (blocking: the store runs in worker threads)."""
        time.sleep(self.backoff(attempts))

    @staticmethod
    def retryable_status(status: int) -> bool:
        """Whether an HTTP error status is worth another attempt (throttling, 5xx)."""
        return status in RETRY_STATUSES

    @staticmethod
    def retryable(error: StoreError) -> bool:
        """Whether an error after a response began is worth another attempt.

        A cut body, a stalled connection or a response that is not what was asked
        for; not a changed object (`StaleError`), a denial or a missing key.
        """
        return isinstance(error, TransientError)

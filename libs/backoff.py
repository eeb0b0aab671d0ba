"""The one exponential backoff: every retry delay in flightlog is computed here.

The schedules differ only in their jitter, which each caller picks for a reason of its own:

* ``"none"``: the delay itself, for a schedule someone else reads back (persist writes a parked
  record's due time into the record);
* ``"full"``: uniform in ``[0, delay)`` (the AWS architecture blog's "full jitter"), for many
  clients of one server that failed together (IMAP accounts of one provider);
* ``"spread"``: the delay times ``[0.75, 1.25)``, for a delay whose size must stay predictable
  (a webhook receiver's retry window) while endpoints that failed together do not retry together.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final, Literal

__all__ = ["Jitter", "backoff_s"]

Jitter = Literal["none", "full", "spread"]

# 2.0 ** 1024 overflows a float; any base is past any cap long before 2 ** 40.
_MAX_EXPONENT: Final = 40


def backoff_s(
    attempt: int,
    base_s: float,
    max_s: float,
    *,
    jitter: Jitter = "none",
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds before retry number ``attempt`` (1 = the first): ``base_s * 2 ** (attempt - 1)``,
    at most ``max_s``, then jittered (see the module docstring; "spread" may exceed ``max_s`` by
    a quarter). ``rand`` returns a float in [0, 1): a seeded one makes a schedule reproducible."""
    delay = min(base_s * 2.0 ** min(max(attempt - 1, 0), _MAX_EXPONENT), max_s)
    if jitter == "full":
        return float(rand() * delay)
    if jitter == "spread":
        return float(delay * (0.75 + 0.5 * rand()))
    return float(delay)

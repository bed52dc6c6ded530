"""Retention priorities of cached prefix pages (who is evicted first).

A request's cached pages carry a *retention priority* from 0 to 100 (default 35, as in
TensorRT-LLM). When the pool runs out of clean pages, the prefix cache evicts the
least recently freed page of the *lowest* priority first, so a system prompt at 90
outlives one-off documents at 35. A priority may last a limited time: ``duration``
seconds after the page is freed it drops back to the default. Parts of a prompt can
have their own priority through :class:`TokenRange`.

A page shared by several requests keeps the strongest retention any of them asked for:
the highest permanent priority, and the strongest timed one until it expires (then the
page drops to that permanent floor, 35 if nobody asked for one).

Examples
--------
>>> from kvcore import Retention, TokenRange
>>> system_prompt_first = Retention(priority=35, ranges=[TokenRange(0, 512, priority=90)])
>>> one_off = Retention(priority=10, duration=30.0)   # 10 for 30 s after it is freed
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DEFAULT_PRIORITY", "MAX_PRIORITY", "MAX_RANGES", "Retention", "TokenRange"]

#: Priority of pages nobody gave another one, and what a priority drops to when its
#: duration expires.
DEFAULT_PRIORITY = 35
#: Highest priority (evicted last).
MAX_PRIORITY = 100
#: Token ranges a :class:`Retention` may carry.
MAX_RANGES = 8
# Durations are kept in int64 nanoseconds: about 292 years.
_MAX_DURATION_S = 9.0e9
# Token positions past any sequence (the core's "to the end").
_MAX_TOKEN = 1 << 62


def _integer(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None


def _priority(value, name: str) -> int:
    value = _integer(value, name)
    if not 0 <= value <= MAX_PRIORITY:
        raise ValueError(f"{name} must be in [0, {MAX_PRIORITY}], got {value}")
    return value


def _duration(value, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number of seconds or None, got "
                        f"{type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and 0 < value <= _MAX_DURATION_S):
        raise ValueError(f"{name} must be in (0, {_MAX_DURATION_S:g}] seconds or None, "
                         f"got {value}")
    return float(value)


def _nanoseconds(seconds: float | None) -> int:
    """0 means no expiry (what the core stores); a positive duration is at least 1 ns."""
    return 0 if seconds is None else max(1, round(seconds * 1e9))


@dataclass(frozen=True)
class TokenRange:
    """A priority for the tokens ``[start, end)`` of one request's sequence.

    Parameters
    ----------
    start : int
        First token, ``>= 0``.
    end : int or None
        One past the last token, ``> start``; None: to the end of the sequence (the
        decoded tokens included).
    priority : int
        0 .. 100.
    duration : float or None
        Seconds the priority lasts after a page is freed; None: for good.

    Notes
    -----
    A page whose tokens fall in several ranges (or partly in none) takes the strongest
    retention among them (and the request's own, for the tokens in no range).
    """

    start: int
    end: int | None
    priority: int
    duration: float | None = None

    def __post_init__(self):
        start = _integer(self.start, "TokenRange.start")
        if not 0 <= start < _MAX_TOKEN:
            raise ValueError(f"TokenRange.start must be in [0, 2**62), got {start}")
        end = self.end
        if end is not None:
            end = _integer(end, "TokenRange.end")
            if end <= start:
                raise ValueError(f"TokenRange.end ({end}) must exceed start ({start})")
            end = min(end, _MAX_TOKEN)   # no sequence is that long: the same range
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)
        object.__setattr__(self, "priority", _priority(self.priority, "TokenRange.priority"))
        object.__setattr__(self, "duration", _duration(self.duration, "TokenRange.duration"))


@dataclass(frozen=True)
class Retention:
    """How long a request's cached prefix pages should be kept.

    Parameters
    ----------
    priority : int
        0 .. 100 for the request's pages (default 35). Eviction takes the lowest
        priority first, the least recently freed within it.
    duration : float or None
        Seconds ``priority`` lasts after a page is freed, after which the page drops to
        priority 35; None: for good.
    ranges : sequence of TokenRange
        At most 8, disjoint: token ranges with their own priority (for example a system
        prompt at 90 in a request at 35).

    Raises
    ------
    TypeError, ValueError
        A priority outside [0, 100], a duration that is not a positive number of
        seconds, more than 8 ranges, or overlapping ranges.
    """

    priority: int = DEFAULT_PRIORITY
    duration: float | None = None
    ranges: tuple[TokenRange, ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "priority", _priority(self.priority, "Retention.priority"))
        object.__setattr__(self, "duration", _duration(self.duration, "Retention.duration"))
        if isinstance(self.ranges, (str, bytes)):
            raise TypeError("Retention.ranges must be a sequence of TokenRange")
        try:
            ranges = tuple(self.ranges)
        except TypeError:
            raise TypeError("Retention.ranges must be a sequence of TokenRange") from None
        for r in ranges:
            if not isinstance(r, TokenRange):
                raise TypeError(f"Retention.ranges holds a {type(r).__name__}, not a TokenRange")
        if len(ranges) > MAX_RANGES:
            raise ValueError(f"Retention.ranges has {len(ranges)} ranges; at most {MAX_RANGES}")
        ranges = tuple(sorted(ranges, key=lambda r: r.start))
        for a, b in itertools.pairwise(ranges):
            if a.end is None or a.end > b.start:
                raise ValueError(f"token ranges [{a.start}, {a.end}) and [{b.start}, {b.end}) "
                                 "overlap")
        object.__setattr__(self, "ranges", ranges)

    def _core_args(self):
        """The values the Cython core stores: (priority, duration_ns, starts, ends,
        priorities, durations_ns), ``end`` None as 2**62."""
        return (self.priority, _nanoseconds(self.duration),
                [r.start for r in self.ranges],
                [_MAX_TOKEN if r.end is None else r.end for r in self.ranges],
                [r.priority for r in self.ranges],
                [_nanoseconds(r.duration) for r in self.ranges])


def retention_arg(value) -> Retention:
    """``add_sequence``'s ``retention``: None (the default), an int priority or a Retention.

    Raises
    ------
    TypeError, ValueError
        Anything else, or an invalid priority.
    """
    if value is None:
        return _DEFAULT
    if isinstance(value, Retention):
        # Rebuilt, not trusted: a subclass, a pickle or object.__setattr__ could have
        # put anything in its fields, and the C core indexes arrays with them.
        try:
            ranges = tuple(value.ranges)
        except TypeError:
            raise TypeError("Retention.ranges must be a sequence of TokenRange") from None
        return Retention(value.priority, value.duration, tuple(
            TokenRange(r.start, r.end, r.priority, r.duration) if isinstance(r, TokenRange)
            else r for r in ranges))
    if isinstance(value, (bool, np.bool_)):
        raise TypeError("retention must be None, an int priority or a Retention, got bool")
    try:
        return Retention(priority=operator.index(value))
    except TypeError:
        raise TypeError("retention must be None, an int priority or a Retention, got "
                        f"{type(value).__name__}") from None


_DEFAULT = Retention()

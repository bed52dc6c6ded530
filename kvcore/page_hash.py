"""The prefix cache's page hash in pure Python: what a router computes to predict hits.

A cached page is identified by its *chained hash*: a 64-bit mix of the hash of the page
before it in the prompt (0 for the first page), the sequence's namespace (tenant,
adapter or salt: ``add_sequence(tokens, namespace=...)``) and the page's ``page_size``
token ids. Equal hashes mean the same prefix, so a router that hashes a request's prompt
with :func:`prompt_hashes` and compares with the hashes a replica published (its
``take_events()``) knows how many leading pages that replica holds, without asking it.

The hash only finds candidates: kvcore accepts a hit after comparing the parent, the
namespace and every token id exactly, so a collision can cost a router a misrouted
request but never serve one request another's KV.

This module is the reference of the C function (``PrefixIndex.chain_hash`` in
``kvcore/_prefix.pyx``); ``tests/test_page_hash.py`` checks that they agree bit for bit.

Examples
--------
>>> hashes = prompt_hashes(list(range(40)), page_size=16)
>>> len(hashes)                     # two full pages; the last 8 tokens are not a page
2
>>> hashes[1] == page_hash(hashes[0], list(range(16, 32)))
True
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["page_hash", "prompt_hashes"]

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _mix(x: int) -> int:
    """splitmix64's finaliser on a 64-bit unsigned value."""
    x ^= x >> 30
    x = (x * _M1) & _MASK
    x ^= x >> 27
    x = (x * _M2) & _MASK
    return x ^ (x >> 31)


def page_hash(parent_hash: int, tokens: Sequence[int], namespace: int = 0) -> int:
    """Chained hash of one full page.

    Parameters
    ----------
    parent_hash : int
        The previous page's hash, an unsigned 64-bit int; 0 for the first page.
    tokens : sequence of int, length page_size
        The page's token ids, each in ``[0, 2**31 - 1]``.
    namespace : int
        The sequence's namespace, a signed 64-bit int (0 by default).

    Returns
    -------
    int
        In ``[0, 2**64)``: the value kvcore's events carry as ``page_hash``.
    """
    tokens = [int(t) for t in tokens]    # NumPy integers would overflow the mixing
    h = _mix((int(parent_hash) & _MASK) ^ _mix(((int(namespace) & _MASK) + _GOLDEN) & _MASK))
    n = len(tokens)
    i = 0
    while i + 1 < n:      # two tokens per 64-bit step, as the C code does
        h ^= (tokens[i] & 0xFFFFFFFF) | ((tokens[i + 1] & 0xFFFFFFFF) << 32)
        h = ((h ^ (h >> 29)) * _M1) & _MASK
        i += 2
    if i < n:
        h = ((h ^ (tokens[i] & 0xFFFFFFFF)) * _M2) & _MASK
    return _mix(h ^ n)


def prompt_hashes(tokens: Sequence[int], page_size: int, namespace: int = 0) -> list[int]:
    """Hashes of every full page of ``tokens``, in order (a partial last page has none).

    A replica that published hash ``prompt_hashes(prompt, ...)[k]`` holds the first
    ``k + 1`` pages of ``prompt``; ``add_sequence`` maps at most
    ``(len(prompt) - 1) // page_size`` of them (one token is always left to compute).
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    hashes, parent = [], 0
    for start in range(0, len(tokens) - page_size + 1, page_size):
        parent = page_hash(parent, tokens[start:start + page_size], namespace)
        hashes.append(parent)
    return hashes

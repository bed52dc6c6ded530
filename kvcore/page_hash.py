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

With ``PageTable(prefix_hash="sha256")`` (``KVCacheConfig(prefix_hash="sha256")``) the
identity is cryptographic instead: a page's digest is SHA-256 over its parent's full
32-byte digest (32 zero bytes for the first page), the namespace as 8 bytes
little-endian (two's complement) and each token id as 4 bytes little-endian; its
64-bit hash, the one events carry, is the digest's first 8 bytes read little-endian
(:func:`page_digest`, ``prompt_hashes(..., algorithm="sha256")``).

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

import hashlib
import struct
from collections.abc import Sequence

__all__ = ["page_digest", "page_hash", "prompt_hashes"]

_ZERO_DIGEST = bytes(32)

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


def page_digest(parent_digest: bytes, tokens: Sequence[int], namespace: int = 0) -> bytes:
    """SHA-256 identity of one full page (``prefix_hash="sha256"``).

    Parameters
    ----------
    parent_digest : bytes, length 32
        The previous page's digest; 32 zero bytes for the first page.
    tokens : sequence of int, length page_size
        The page's token ids, each in ``[0, 2**31 - 1]``.
    namespace : int
        The sequence's namespace, a signed 64-bit int.

    Returns
    -------
    bytes, length 32
        The digest; ``int.from_bytes(digest[:8], "little")`` is the page's 64-bit hash.
    """
    if len(parent_digest) != 32:
        raise ValueError(f"parent_digest must be 32 bytes, got {len(parent_digest)}")
    tokens = [int(t) & 0xFFFFFFFF for t in tokens]
    return hashlib.sha256(bytes(parent_digest) + struct.pack("<Q", int(namespace) & _MASK)
                          + struct.pack(f"<{len(tokens)}I", *tokens)).digest()


def prompt_hashes(tokens: Sequence[int], page_size: int, namespace: int = 0, *,
                  algorithm: str = "fast") -> list[int]:
    """Hashes of every full page of ``tokens``, in order (a partial last page has none).

    A replica that published hash ``prompt_hashes(prompt, ...)[k]`` holds the first
    ``k + 1`` pages of ``prompt``; ``add_sequence`` maps at most
    ``(len(prompt) - 1) // page_size`` of them (one token is always left to compute).
    ``algorithm`` is the replicas' ``prefix_hash``: ``"fast"`` or ``"sha256"``.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if algorithm not in ("fast", "sha256"):
        raise ValueError(f"algorithm must be 'fast' or 'sha256', got {algorithm!r}")
    hashes, parent, digest = [], 0, _ZERO_DIGEST
    for start in range(0, len(tokens) - page_size + 1, page_size):
        page = tokens[start:start + page_size]
        if algorithm == "sha256":
            digest = page_digest(digest, page, namespace)
            parent = int.from_bytes(digest[:8], "little")
        else:
            parent = page_hash(parent, page, namespace)
        hashes.append(parent)
    return hashes

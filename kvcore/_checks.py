"""Argument checkers shared by the facade and both backends: one per kind of argument,
so the same mistake gets the same error type and message everywhere."""

from __future__ import annotations

import operator

import numpy as np

from kvcore._core import first_slot_out_of_range
from kvcore.config import KVCacheConfig
from kvcore.errors import InvalidPageError, ShapeError

__all__ = ["check_host_slots", "check_kv_shape", "host_index_array", "host_page_pair",
           "kv_dtype_ok", "takes"]

#: dtypes accepted for K/V besides the cache's own: bfloat16 also arrives as raw words,
#: fp8 codes as bytes.
_WORDS = {"bfloat16": ("bfloat16", "uint16", "int16"),
          "float8_e4m3fn": ("float8_e4m3fn", "uint8")}


def kv_dtype_ok(cache_dtype: str, dtype_name: str) -> bool:
    """Whether K/V of ``dtype_name`` hold elements of ``cache_dtype`` (a pool dtype or a
    model dtype): bfloat16 also as uint16 / int16 words, float8_e4m3fn as uint8 codes."""
    words = _WORDS.get(cache_dtype)
    if words is not None:
        return dtype_name in words
    return dtype_name == cache_dtype


def takes(config: KVCacheConfig) -> str:
    """What a write takes, for error messages: the pool's dtype, or an fp8 pool's
    model dtype."""
    if config.quantized:
        return f"the {config.dtype} cache takes {config.model_dtype}"
    return f"the cache holds {config.dtype}"


def check_kv_shape(shape, config: KVCacheConfig, name: str) -> None:
    """``shape`` must be ``[T, num_kv_heads, head_dim]``."""
    if len(shape) != 3 or shape[1] != config.num_kv_heads or shape[2] != config.head_dim:
        raise ShapeError(f"{name} must have shape [T, {config.num_kv_heads}, "
                         f"{config.head_dim}], got {tuple(shape)}")


def host_index_array(values, name: str) -> np.ndarray:
    """``values`` (list, tuple or NumPy integer array, any byte order) as 1-D native int64.

    Checked in this order: a shape other than 1-D (a scalar included) is a
    ``ShapeError`` (itself a ``ValueError``); an element that is not an integer is a
    ``TypeError``; an integer outside int64 is a ``ValueError``.
    """
    if type(values) is np.ndarray and values.dtype == np.int64 and values.ndim == 1:
        return values
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{name} must be a 1-D array of integers ({exc})") from None
    except Exception as exc:   # a caller's __array__ / __len__ may raise anything
        raise TypeError(f"{name} could not be read as an array ({exc!r})") from exc
    if arr.ndim != 1:             # the first mistake checked: a scalar is not an array
        raise ShapeError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0 and arr.dtype.kind not in "iu":
        arr = arr.astype(np.int64)
    if arr.dtype == object:      # Python ints too big for NumPy, __index__ objects, ...
        arr = _object_ints(arr, name)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds {int(arr.max())}, outside the int64 range")
    return arr.astype(np.int64, copy=False)   # also converts a non-native byte order


def _object_ints(arr: np.ndarray, name: str) -> np.ndarray:
    """An object array of integers (anything with ``__index__``, not bool) as int64."""
    values = []
    for item in arr.reshape(-1):
        if isinstance(item, (bool, np.bool_)):
            raise TypeError(f"{name} must hold integers, got a bool")
        try:
            values.append(operator.index(item))
        except Exception:   # TypeError, or whatever a user's __index__ raised
            raise TypeError(f"{name} must hold integers, got {type(item).__name__}") from None
    for value in values:
        if not -2**63 <= value < 2**63:
            raise ValueError(f"{name} holds {value}, outside the int64 range")
    return np.array(values, dtype=np.int64).reshape(arr.shape)


def check_host_slots(slot_mapping, num_tokens: int | None, num_slots: int) -> np.ndarray:
    """A host ``slot_mapping`` of ``num_tokens`` entries (any number for None), each -1
    or in ``[0, num_slots)``."""
    slots = host_index_array(slot_mapping, "slot_mapping")
    if num_tokens is not None and slots.shape != (num_tokens,):
        raise ShapeError(f"slot_mapping must have shape [{num_tokens}] (one slot per "
                         f"token of k), got {slots.shape}")
    bad = first_slot_out_of_range(slots, num_slots)
    if bad is not None:
        raise InvalidPageError(f"slot {bad} out of range [0, {num_slots}) (-1 marks padding)")
    return slots


def host_page_pair(src, dst, num_pages: int) -> tuple[np.ndarray, np.ndarray]:
    """``src``, ``dst`` page ids as int32: equal lengths, in range, ``dst`` distinct and
    disjoint from ``src``."""
    src_arr = host_index_array(src, "src")
    dst_arr = host_index_array(dst, "dst")
    if src_arr.shape != dst_arr.shape:
        raise ValueError(f"src and dst differ in length: {src_arr.size} != {dst_arr.size}")
    for name, arr in (("src", src_arr), ("dst", dst_arr)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_pages):
            bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
            raise InvalidPageError(f"{name} page {bad} out of range [0, {num_pages})")
    if dst_arr.size:
        dst_count = np.bincount(dst_arr, minlength=num_pages)
        if dst_count.max() > 1:
            raise ValueError(f"dst repeats page {int(dst_count.argmax())}")
        overlap = dst_count[src_arr] > 0
        if overlap.any():
            raise ValueError(f"page {int(src_arr[overlap.argmax()])} is both a src and a dst")
    return src_arr.astype(np.int32), dst_arr.astype(np.int32)

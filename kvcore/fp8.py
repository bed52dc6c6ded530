"""fp8 e4m3 quantization, bit for bit as kvcore's CUDA kernels do it (the NumPy oracle).

One convention everywhere, the one vLLM and FlashInfer use: **real value = fp8 value x
scale**. Quantizing a float16 / bfloat16 element ``x`` with a float32 ``scale``:

1. ``y = float32(x) / scale`` in float32 (IEEE division, round to nearest even);
2. NaN stays NaN, as the code ``0x7F``; otherwise ``y`` is clamped to ``[-448, 448]``
   (e4m3fn has no infinity: a plain cast past 448 gives NaN, CUDA's saturating
   conversion gives +-448);
3. ``y`` is rounded to the nearest e4m3fn value, ties to the even code (what
   ``cvt.rn.satfinite.e4m3x2.f32`` does on the GPU).

Dequantizing code ``c``: ``float32(e4m3(c)) * scale`` in float32, then rounded to
float16 / bfloat16 (nearest even); a NaN code gives that dtype's canonical quiet NaN
(``0x7E00`` / ``0x7FC0``).

e4m3fn, worked example: ``0x4C`` is sign 0, exponent ``0b1001`` = 9, mantissa ``0b100``
= 4, so ``(1 + 4/8) * 2**(9 - 7) = 6.0``; codes with exponent 0 are subnormal, ``m *
2**-9``; ``0x7F`` and ``0xFF`` are NaN; the largest finite value is ``0x7E`` = 448.

bfloat16 arrays are uint16 words here (as everywhere in kvcore), float16 arrays are
``numpy.float16``; which one a word array means is said by ``dtype``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["E4M3_MAX", "E4M3_NAN", "MIN_SCALE", "dequantize", "e4m3_to_float32",
           "float32_to_bfloat16", "quantize", "scale_for_amax", "token_head_scales"]

#: Largest finite float8_e4m3fn value.
E4M3_MAX = 448.0
#: The NaN code quantize writes (positive; e4m3fn's NaNs are 0x7F and 0xFF).
E4M3_NAN = 0x7F

#: The smallest scale a pool uses: ``set_kv_scales`` refuses smaller ones, and computed
#: scales below it become 1.0. Why: CuPy compiles every kernel with ``-ftz=true``, so
#: the GPU flushes float32 subnormals to zero. From ``2**-116`` up, nothing that can
#: change a code or a dequantized value is subnormal: an element ``x`` that is subnormal
#: (``< 2**-126``) gives ``|x / scale| <= 2**-10``, which rounds to a signed zero either
#: way, a normal ``x`` gives a normal quotient, and ``code x scale >= 2**-9 x 2**-116``
#: is normal. So the GPU equals this module bit for bit, flushing or not.
MIN_SCALE = 2.0 ** -116

_MIN_NORMAL_EXP = -6     # 2**-6, the smallest normal e4m3fn value
_SUBNORMAL_STEP = 2.0 ** -9


def _decode_table() -> np.ndarray:
    """float32 value of every code 0..255 (NaN for 0x7F, 0xFF), built from the fields."""
    codes = np.arange(256, dtype=np.uint32)
    sign = codes >> 7
    exponent = (codes >> 3) & 0xF
    mantissa = codes & 0x7
    normal = ((sign << 31) | ((exponent + 120) << 23) | (mantissa << 20)).view(np.float32)
    subnormal = (mantissa.astype(np.float32) * np.float32(_SUBNORMAL_STEP)
                 * np.where(sign == 1, np.float32(-1), np.float32(1)))
    values = np.where(exponent == 0, subnormal, normal).astype(np.float32)
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values


_TABLE = _decode_table()
_TABLE.flags.writeable = False


def e4m3_to_float32(codes) -> np.ndarray:
    """Float32 values of e4m3fn codes.

    Parameters
    ----------
    codes : array_like of uint8, any shape

    Returns
    -------
    numpy.ndarray of float32, the same shape (a new array; NaN for 0x7F and 0xFF)
    """
    return _TABLE[np.asarray(codes, dtype=np.uint8)]


def _as_float32(x, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        words = np.asarray(x).view(np.uint16)
        return (words.astype(np.uint32) << 16).view(np.float32)
    if dtype == "float16":
        return np.asarray(x, dtype=np.float16).astype(np.float32)
    raise ValueError(f"dtype must be 'float16' or 'bfloat16', got {dtype!r}")


def quantize(x, scale, dtype: str) -> np.ndarray:
    """Quantize float16 / bfloat16 elements to e4m3fn codes (see the module docstring).

    Parameters
    ----------
    x : numpy.ndarray, any shape
        float16 values (``dtype="float16"``) or bfloat16 as uint16 / int16 words
        (``dtype="bfloat16"``). Not modified.
    scale : float or numpy.ndarray of float32
        Real value = code value x scale; finite and > 0. An array broadcasts against
        ``x`` (per token and head: shape ``[T, H, 1]``).
    dtype : {"float16", "bfloat16"}

    Returns
    -------
    numpy.ndarray of uint8, ``x``'s shape (a new array)

    Raises
    ------
    ValueError
        A scale that is not finite and > 0, or an unknown ``dtype``.

    Examples
    --------
    >>> quantize(np.array([6.0, 1000.0, -0.001, -0.0005], dtype=np.float16), 1.0, "float16")
    array([ 76, 126, 129, 128], dtype=uint8)
    """
    scale = np.asarray(scale, dtype=np.float32)
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("scale must be finite float32 values > 0")
    with np.errstate(over="ignore", invalid="ignore"):
        y = _as_float32(x, dtype) / scale
    return _round_to_e4m3(y)


def _round_to_e4m3(y: np.ndarray) -> np.ndarray:
    """float32 -> e4m3fn codes: NaN to 0x7F, clamp to +-448, round to nearest even.

    On the float32 bits of ``m = min(|y|, 448)``: from ``2**-6`` up (e4m3fn's normals)
    the code is the bits' exponent and top three mantissa bits, rounded to nearest even
    by adding ``0x7FFFF`` plus the last kept bit before the shift by 20 (a carry rolls
    into the exponent), with the exponent rebased from 127 to 7 (``- (120 << 3)``);
    below ``2**-6`` it is the count of subnormal steps ``rint(m * 2**9)`` (exact scaling,
    NumPy's half-even ``rint``; 8 steps is ``2**-6`` itself, code 0x08, where the two
    encodings meet). The sign bit is ``y``'s. Worked example: ``17.0`` is ``0x41880000``;
    ``0x41880000 >> 20 = 0x418`` with the dropped bits exactly half (``0x80000``) and the
    kept bit 0, so it stays: ``0x418 - 0x3C0 = 0x58`` (16, ties to even); ``19.0`` is
    ``0x41980000``, kept bit 1, rounds up to ``0x41A`` -> ``0x5A`` (20).
    """
    y = np.asarray(y, dtype=np.float32)
    nan = np.isnan(y)
    sign = (y.view(np.uint32) >> np.uint32(24)) & np.uint32(0x80)
    with np.errstate(invalid="ignore"):
        magnitude = np.minimum(np.abs(np.where(nan, np.float32(0), y)), np.float32(E4M3_MAX))
    bits = magnitude.view(np.uint32)
    normal = ((bits + np.uint32(0x7FFFF) + ((bits >> np.uint32(20)) & np.uint32(1)))
              >> np.uint32(20)) - np.uint32(120 << 3)
    subnormal = np.rint(magnitude * np.float32(2.0**9)).astype(np.uint32)
    code = np.where(bits >= np.uint32(0x3C800000), normal, subnormal) | sign
    return np.where(nan, np.uint32(E4M3_NAN), code).astype(np.uint8)


def dequantize(codes, scale, dtype: str) -> np.ndarray:
    """e4m3fn codes back to float16 / bfloat16: ``value(code) * scale`` in float32, then
    rounded to nearest even (see the module docstring).

    Parameters
    ----------
    codes : numpy.ndarray of uint8, any shape
    scale : float or numpy.ndarray of float32
        Finite and > 0; an array broadcasts against ``codes``.
    dtype : {"float16", "bfloat16"}

    Returns
    -------
    numpy.ndarray
        float16, or bfloat16 as uint16 words; ``codes``' shape (a new array).

    Examples
    --------
    >>> dequantize(np.array([76, 126], dtype=np.uint8), 0.5, "float16")
    array([  3., 224.], dtype=float16)
    """
    scale = np.asarray(scale, dtype=np.float32)
    with np.errstate(over="ignore"):              # past float32's range: inf, as on the GPU
        values = e4m3_to_float32(codes) * scale  # float32 * float32: one rounding
    nan = np.isnan(values)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            out = values.astype(np.float16)
        out[nan] = np.uint16(0x7E00).view(np.float16)
        return out
    if dtype == "bfloat16":
        return float32_to_bfloat16(values)
    raise ValueError(f"dtype must be 'float16' or 'bfloat16', got {dtype!r}")


def float32_to_bfloat16(values) -> np.ndarray:
    """float32 to bfloat16 words, round to nearest even; NaN to ``0x7FC0``.

    Worked example: ``1 + 2**-8`` is ``0x3F808000``; the low half ``0x8000`` is exactly
    half way and the kept half ``0x3F80`` is even, so it stays ``0x3F80`` (1.0).
    """
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    words = (rounded >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), words)


def scale_for_amax(amax) -> np.float32:
    """The computed scale of a tensor whose largest magnitude is ``amax``: ``amax / 448``
    in float32, so the largest element quantizes to +-448 exactly; 1.0 when that is not
    finite or is below :data:`MIN_SCALE` (an all-zero or all-tiny tensor, or one holding
    inf / NaN).

    Examples
    --------
    >>> float(scale_for_amax(8.96))
    0.019999999552965164
    """
    value = np.float32(amax) / np.float32(E4M3_MAX)
    if not (np.isfinite(value) and value >= np.float32(MIN_SCALE)):
        return np.float32(1.0)
    return value


def token_head_scales(x, dtype: str) -> np.ndarray:
    """Per-(token, head) scales of ``x`` ``[T, H, D]``, as a ``kv_scale_granularity=
    "token_head"`` pool computes them when it writes ``x``.

    The rule (the CUDA kernel's, bit for bit): ``amax = max |x[t, h, :]|`` in float32
    (exact: no rounding; NaN if the row holds a NaN), then ``scale = amax / 448`` in
    float32 (IEEE division, round to nearest even), replaced by 1.0 unless finite and
    >= :data:`MIN_SCALE` (an all-zero or all-tiny row, or one holding inf / NaN), as
    :func:`scale_for_amax`. The row is then quantized with ``quantize(x[t, h], scale)``,
    so its largest element lands on +-448 exactly.

    Parameters
    ----------
    x : numpy.ndarray, shape [T, H, D]
        float16, or bfloat16 as uint16 / int16 words. Not modified.
    dtype : {"float16", "bfloat16"}

    Returns
    -------
    numpy.ndarray of float32, shape [T, H] (a new array)

    Examples
    --------
    >>> x = np.array([[[8.96, -1.0], [0.0, 0.0]]], dtype=np.float16)
    >>> token_head_scales(x, "float16").tolist()
    [[0.0200020931661129, 1.0]]
    """
    values = _as_float32(x, dtype)
    if values.ndim != 3:
        raise ValueError(f"x must be [T, H, D], got shape {values.shape}")
    if values.shape[2] == 0:
        return np.ones(values.shape[:2], dtype=np.float32)
    amax = np.max(np.abs(values), axis=2)            # NaN propagates, as in the kernel
    with np.errstate(over="ignore", invalid="ignore"):
        scale = amax / np.float32(E4M3_MAX)
    keep = np.isfinite(scale) & (scale >= np.float32(MIN_SCALE))
    return np.where(keep, scale, np.float32(1.0)).astype(np.float32)

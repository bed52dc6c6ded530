"""fp8 e4m3 quantization (kvcore.fp8) exactly, and fp8 / key-only (MLA) pools on the CPU.

The quantizer is checked over every float16 and every bfloat16 input against a
reference that shares no code with it: a nearest-value search over the 254 finite e4m3
values in float64 (ties to the even code), and torch's own float8_e4m3fn cast where
torch is installed.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvcore import KVCache, KVCacheConfig, ShapeError, fp8

ALL_WORDS = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
FP8_NAME = "float8_e4m3fn"
SCALES = [1.0, 0.0173, 3.7, 2.0**-10, 1234.5, 1e-30]


def reference_values(words, dtype):
    """float64 of float16 / bfloat16 words, without kvcore.fp8."""
    if dtype == "float16":
        return words.view(np.float16).astype(np.float64)
    return (words.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def finite_codes():
    """(codes, values): the 254 finite e4m3fn codes and their float64 values, decoded
    from the format's definition."""
    codes, values = [], []
    for code in range(256):
        sign, exponent, mantissa = code >> 7, (code >> 3) & 15, code & 7
        if exponent == 15 and mantissa == 7:
            continue                              # NaN
        value = (mantissa / 8 * 2.0**-6 if exponent == 0
                 else (1 + mantissa / 8) * 2.0 ** (exponent - 7))
        codes.append(code)
        values.append(-value if sign else value)
    return np.array(codes), np.array(values)


def reference_quantize(words, scale, dtype):
    """Nearest finite e4m3 value of clamp(float32(x / scale)), ties to the even code;
    NaN -> 0x7F. Zero keeps its sign (0x00 / 0x80)."""
    codes, values = finite_codes()
    with np.errstate(over="ignore", invalid="ignore"):
        y = (reference_values(words, dtype).astype(np.float32) / np.float32(scale)).astype(
            np.float64)
    out = np.empty(y.shape, dtype=np.uint8)
    nan = np.isnan(y)
    clamped = np.clip(np.where(nan, 0, y), -448, 448)
    for start in range(0, y.size, 4096):
        part = clamped[start:start + 4096]
        distance = np.abs(part[:, None] - values[None, :])
        best = distance.min(axis=1, keepdims=True)
        tied = distance == best
        # among the nearest: prefer an even code (last mantissa bit 0); for zero, the
        # zero of the input's sign
        even = (codes % 2 == 0)[None, :]
        pick = np.where(tied & even, 1, 0) + np.where(tied, 1, 0)
        chosen = codes[pick.argmax(axis=1)]
        zero = part == 0
        chosen = np.where(zero, np.where(np.signbit(part), 0x80, 0x00), chosen)
        out[start:start + 4096] = chosen
    out[nan] = 0x7F
    return out


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_quantize_every_input_matches_the_nearest_value_search(dtype, scale):
    words = ALL_WORDS if dtype == "bfloat16" else ALL_WORDS.view(np.float16)
    got = fp8.quantize(words, scale, dtype)
    want = reference_quantize(ALL_WORDS, scale, dtype)
    # signed zeros: the search keeps the sign of float32(x / scale) == 0; a value that
    # rounds to zero from either side keeps its own sign, as the hardware does
    with np.errstate(over="ignore", invalid="ignore"):
        y = reference_values(ALL_WORDS, dtype).astype(np.float32) / np.float32(scale)
    rounds_to_zero = (np.abs(y) <= 2.0**-10) & ~np.isnan(y)
    want[rounds_to_zero] = np.where(np.signbit(y[rounds_to_zero]), 0x80, 0x00)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_quantize_every_input_matches_torch(dtype, scale):
    torch = pytest.importorskip("torch")
    with np.errstate(over="ignore", invalid="ignore"):
        y = reference_values(ALL_WORDS, dtype).astype(np.float32) / np.float32(scale)
    nan = np.isnan(y)
    clamped = np.clip(np.where(nan, 0, y), -448, 448).astype(np.float32)
    want = torch.from_numpy(clamped).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    want = np.where(nan, 0x7F, want)
    words = ALL_WORDS if dtype == "bfloat16" else ALL_WORDS.view(np.float16)
    np.testing.assert_array_equal(fp8.quantize(words, scale, dtype), want)


def test_decode_table_matches_the_format_definition():
    codes, values = finite_codes()
    got = fp8.e4m3_to_float32(codes.astype(np.uint8))
    np.testing.assert_array_equal(got.astype(np.float64), values)
    assert np.isnan(fp8.e4m3_to_float32(np.array([0x7F, 0xFF], dtype=np.uint8))).all()
    assert fp8.e4m3_to_float32(np.array([0x7E], dtype=np.uint8))[0] == fp8.E4M3_MAX


@pytest.mark.parametrize("scale", SCALES)
def test_dequantize_every_code(scale):
    codes = np.arange(256, dtype=np.uint8)
    _, values = finite_codes()
    finite = (codes & 0x7F) != 0x7F
    # float32(value * scale): the exact product (4 + 24 significant bits fit float64)
    # rounded once
    product = (values * np.float64(np.float32(scale))).astype(np.float32)
    f16 = fp8.dequantize(codes, scale, "float16")
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(f16[finite], product.astype(np.float16))
    assert (f16[~finite].view(np.uint16) == 0x7E00).all()
    bf16 = fp8.dequantize(codes, scale, "bfloat16")
    np.testing.assert_array_equal(bf16[finite], reference_bfloat16(product))
    assert (bf16[~finite] == 0x7FC0).all()


def reference_bfloat16(values):
    """Nearest bfloat16 of float32 values, ties to even, by comparing the two
    neighbours in float64."""
    bits = values.view(np.uint32)
    low = (bits >> 16).astype(np.uint32)
    high = low + 1
    as_f64 = lambda w: (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    with np.errstate(over="ignore", invalid="ignore"):
        d_low = np.abs(values.astype(np.float64) - as_f64(low))
        d_high = np.abs(as_f64(high) - values.astype(np.float64))
    pick_high = (d_high < d_low) | ((d_high == d_low) & (low % 2 == 1))
    return np.where(pick_high, high, low).astype(np.uint16)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_codes_survive_a_round_trip_at_scale_one(dtype):
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], dtype=np.uint8)
    np.testing.assert_array_equal(
        fp8.quantize(fp8.dequantize(codes, 1.0, dtype), 1.0, dtype), codes)


def test_scale_for_amax():
    assert fp8.scale_for_amax(448.0) == 1.0
    assert fp8.scale_for_amax(0.0) == 1.0
    assert fp8.scale_for_amax(float("inf")) == 1.0
    assert fp8.scale_for_amax(float("nan")) == 1.0
    assert fp8.scale_for_amax(8.96) == np.float32(8.96) / np.float32(448)
    # below MIN_SCALE (an all-tiny tensor; subnormals the GPU would flush): 1.0
    assert fp8.scale_for_amax(448 * 2.0**-116) == np.float32(2.0**-116)
    assert fp8.scale_for_amax(np.nextafter(np.float32(448 * 2.0**-116), np.float32(0))) == 1.0
    assert fp8.scale_for_amax(1e-39) == 1.0


def test_quantize_refuses_bad_scales_and_dtypes():
    x = np.ones(4, dtype=np.float16)
    for scale in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale must be finite"):
            fp8.quantize(x, scale, "float16")
    with pytest.raises(ValueError, match="dtype must be 'float16' or 'bfloat16'"):
        fp8.quantize(x, 1.0, "float32")
    with pytest.raises(ValueError, match="dtype must be 'float16' or 'bfloat16'"):
        fp8.dequantize(np.zeros(2, dtype=np.uint8), 1.0, "float32")


@given(hnp.arrays(np.float32, st.integers(1, 64),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
       st.floats(min_value=2.0**-20, max_value=2.0**20, width=32))
def test_rounding_matches_the_search_on_any_float32(values, scale):
    """The float32 rounding step on its own, over arbitrary float32 (not only the values
    a float16 / bfloat16 input can give)."""
    with np.errstate(over="ignore", invalid="ignore"):
        quotient = values / np.float32(scale)
    got = fp8._round_to_e4m3(quotient)
    y = quotient.astype(np.float64)
    codes, table = finite_codes()
    for value, code in zip(y, got, strict=True):
        if np.isnan(value):
            assert code == 0x7F
            continue
        v = min(max(value, -448.0), 448.0)
        distance = np.abs(table - v)
        nearest = codes[distance == distance.min()]
        if v == 0 or distance.min() == abs(v):   # rounds to a zero: the sign is kept
            assert code == (0x80 if np.signbit(value) else 0x00) or code in nearest
        else:
            assert code in nearest
            if len(nearest) > 1:
                assert code % 2 == 0


# -- configs -----------------------------------------------------------------------------------

def fp8_config(**kw):
    base = dict(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, num_pages=16,
                dtype="float8_e4m3fn", max_seqs=8)
    base.update(kw)
    return KVCacheConfig(**base)


def test_config_fp8_and_key_only():
    cfg = fp8_config()
    assert cfg.dtype == "float8_e4m3fn" and cfg.itemsize == 1 and cfg.quantized
    assert cfg.model_dtype == "bfloat16" and cfg.storage_dtype == np.uint8
    for alias in ("fp8", "fp8_e4m3", "float8_e4m3"):
        assert fp8_config(dtype=alias).dtype == "float8_e4m3fn"
    assert fp8_config(model_dtype="fp16").model_dtype == "float16"
    bf16 = fp8_config(dtype="bfloat16")
    assert bf16.model_dtype == "bfloat16" and not bf16.quantized
    assert bf16.page_bytes == 2 * fp8_config().page_bytes
    mla = fp8_config(dtype="bfloat16", num_kv_heads=1, head_dim=576, key_only=True)
    assert mla.pool_shape == (2, 1, 16, 4, 1, 576) and mla.tensors_per_token == 1
    assert mla.page_bytes * 2 == fp8_config(dtype="bfloat16", num_kv_heads=1,
                                            head_dim=576).page_bytes
    assert mla.host_pool_shape == (0, 2, 1, 4, 1, 576)


@pytest.mark.parametrize(("kw", "error", "message"), [
    (dict(model_dtype="float32"), ValueError,
     r"model_dtype of a float8_e4m3fn pool must be one of \['float16', 'bfloat16'\]"),
    (dict(model_dtype="int4"), ValueError, "model_dtype must be one of"),
    (dict(dtype="float16", model_dtype="bfloat16"), ValueError,
     r"model_dtype must be None or the pool's dtype \(float16\)"),
    (dict(key_only=1), TypeError, "key_only must be a bool, got int"),
    (dict(dtype="float8_e5m2"), ValueError, "dtype must be one of"),
])
def test_config_refuses(kw, error, message):
    with pytest.raises(error, match=message):
        fp8_config(**kw)


# -- an fp8 cache on the CPU ------------------------------------------------------------------

def bf16_words(values):
    return (np.asarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


@pytest.fixture(params=["NHD", "HND"])
def fp8_cache(request):
    cache = KVCache(fp8_config(layout=request.param), device="cpu")
    seq = cache.add_sequence()
    step = cache.append([seq], [7])
    return cache, seq, step.slot_mapping


def test_write_quantizes_and_gather_dequantizes(fp8_cache):
    cache, seq, slots = fp8_cache
    rng = np.random.default_rng(0)
    k = bf16_words(rng.standard_normal((7, 2, 8)) * 30)
    v = bf16_words(rng.standard_normal((7, 2, 8)))
    cache.set_kv_scales(1, 0.125, 0.01)
    cache.write(1, k, v, slots)
    k_raw, v_raw, indptr = cache.gather(1, [seq], raw=True)
    assert k_raw.dtype == np.uint8 and indptr.tolist() == [0, 7]
    np.testing.assert_array_equal(k_raw, fp8.quantize(k, 0.125, "bfloat16"))
    np.testing.assert_array_equal(v_raw, fp8.quantize(v, 0.01, "bfloat16"))
    k_out, v_out, _ = cache.gather(1, [seq])
    assert k_out.dtype == np.uint16
    np.testing.assert_array_equal(k_out, fp8.dequantize(k_raw, 0.125, "bfloat16"))
    np.testing.assert_array_equal(v_out, fp8.dequantize(v_raw, 0.01, "bfloat16"))
    # the pool holds the same codes where the slots point
    pages, offsets = np.divmod(slots, 4)
    pool_k = cache.k_cache(1)
    got = (pool_k[pages, offsets] if cache.config.layout == "NHD"
           else pool_k[pages, :, offsets])
    np.testing.assert_array_equal(got, k_raw)


def test_gather_into_given_outputs(fp8_cache):
    cache, seq, slots = fp8_cache
    k = bf16_words(np.ones((7, 2, 8)))
    cache.write(0, k, k, slots)
    out = (np.empty((9, 2, 8), np.uint16), np.empty((9, 2, 8), np.int16))
    got, _, _ = cache.gather(0, [seq], out=out)
    assert got is out[0]
    np.testing.assert_array_equal(out[0][:7], k)
    raw_out = (np.empty((7, 2, 8), np.uint8), np.empty((7, 2, 8), np.uint8))
    cache.gather(0, [seq], out=raw_out, raw=True)
    assert (raw_out[0] == 0x38).all()          # 1.0 is 0x38 in e4m3fn
    with pytest.raises(ShapeError, match="k_out has dtype uint8, the gather gives bfloat16"):
        cache.gather(0, [seq], out=raw_out)
    with pytest.raises(ShapeError, match="k_out has dtype uint16, the gather gives "
                                         "float8_e4m3fn"):
        cache.gather(0, [seq], out=out, raw=True)


def test_write_refuses_the_pool_dtype_and_writes_nothing(fp8_cache):
    cache, _, slots = fp8_cache
    before = cache.kv.copy()
    codes = np.zeros((7, 2, 8), dtype=np.uint8)
    with pytest.raises(ShapeError, match="k has dtype uint8, the float8_e4m3fn cache takes "
                                         "bfloat16"):
        cache.write(0, codes, codes, slots)
    with pytest.raises(ShapeError, match="k has dtype float16, the float8_e4m3fn cache "
                                         "takes bfloat16"):
        cache.write(0, np.zeros((7, 2, 8), np.float16), np.zeros((7, 2, 8), np.float16),
                    slots)
    np.testing.assert_array_equal(cache.kv, before)


def test_float16_model_dtype():
    cache = KVCache(fp8_config(model_dtype="float16"), device="cpu")
    seq = cache.add_sequence()
    slots = cache.append([seq], [3]).slot_mapping
    k = np.array([[[0.5, -3, 1e4, np.nan, np.inf, -np.inf, 2.0**-12, 0]] * 2] * 3,
                 dtype=np.float16)
    cache.write(0, k, k, slots)
    k_raw, _, _ = cache.gather(0, [seq], raw=True)
    np.testing.assert_array_equal(k_raw[0, 0], [0x30, 0xC4, 0x7E, 0x7F, 0x7E, 0xFE, 0x00,
                                                0x00])
    k_out, _, _ = cache.gather(0, [seq])
    assert k_out.dtype == np.float16
    want = np.array([0.5, -3, 448, 0, 448, -448, 0, 0], dtype=np.float16).view(np.uint16)
    want[3] = 0x7E00                          # NaN comes back as the canonical NaN
    np.testing.assert_array_equal(k_out[0, 0].view(np.uint16), want)


def test_static_scales_are_checked_before_anything_changes(fp8_cache):
    cache, _, _ = fp8_cache
    cache.set_kv_scales(0, 0.5, 2)
    assert cache.kv_scales(0) == (0.5, 2.0) and cache.kv_scales(1) == (1.0, 1.0)
    for args, error, message in [
            ((0, 0.0, 1.0), ValueError, r"k_scale must be finite and >= 2\*\*-116 "
                                        r"\(kvcore.fp8.MIN_SCALE\) as a float32, got 0.0"),
            ((0, 1.0, -2.0), ValueError, r"v_scale must be finite and >= 2\*\*-116"),
            ((0, 1e40, 1.0), ValueError, r"k_scale must be finite and >= 2\*\*-116 "
                                         r"\(kvcore.fp8.MIN_SCALE\) as a float32, got 1e\+40"),
            ((0, 1e-50, 1.0), ValueError, r"k_scale must be finite and >= 2\*\*-116"),
            ((0, 1e-36, 1.0), ValueError, r"k_scale must be finite and >= 2\*\*-116"),
            ((0, float("nan"), 1.0), ValueError, "k_scale must be finite"),
            ((0, 1.0), ValueError, "v_scale is required: the cache holds K and V"),
            ((0, "1", 1.0), TypeError, "k_scale must be a real number, got str"),
            ((0, True, 1.0), TypeError, "k_scale must be a real number, got bool"),
            ((0, 1.0, 1j), TypeError, "v_scale must be a real number, got complex"),
            ((2, 1.0, 1.0), IndexError, r"layer 2 out of range \[0, 2\)")]:
        with pytest.raises(error, match=message):
            cache.set_kv_scales(*args)
        assert cache.kv_scales(0) == (0.5, 2.0)
    np.testing.assert_array_equal(cache.scale_table, [[0.5, 2.0], [1.0, 1.0]])


def test_calibrated_scales_put_the_largest_element_on_448(fp8_cache):
    cache, seq, slots = fp8_cache
    k = bf16_words(np.linspace(-20, 3, 7 * 2 * 8).reshape(7, 2, 8))
    v = bf16_words(np.linspace(-1, 0.5, 7 * 2 * 8).reshape(7, 2, 8))
    k_scale, v_scale = cache.calibrate_kv_scales(1, k, v)
    assert k_scale == np.float32(20) / np.float32(448)
    assert v_scale == np.float32(1) / np.float32(448)
    assert cache.kv_scales(1) == (k_scale, v_scale)
    cache.write(1, k, v, slots)
    k_raw, v_raw, _ = cache.gather(1, [seq], raw=True)
    assert k_raw.reshape(-1)[0] == 0xFE and v_raw.reshape(-1)[0] == 0xFE    # -448
    before = cache.kv_scales(1)
    with pytest.raises(ShapeError, match="v is None, but the cache holds K and V"):
        cache.calibrate_kv_scales(1, k)
    with pytest.raises(ShapeError, match="k has dtype float32"):
        cache.calibrate_kv_scales(1, k.astype(np.float32), v)
    assert cache.kv_scales(1) == before


def test_scales_are_refused_on_16_bit_pools():
    cache = KVCache(fp8_config(dtype="bfloat16"), device="cpu")
    for call in (lambda: cache.set_kv_scales(0, 1.0, 1.0), lambda: cache.kv_scales(0),
                 lambda: cache.scale_table,
                 lambda: cache.calibrate_kv_scales(0, np.zeros((1, 2, 8), np.uint16),
                                                   np.zeros((1, 2, 8), np.uint16))):
        with pytest.raises(ValueError, match="the pool holds bfloat16, which has no scales"):
            call()


def test_copy_on_write_moves_fp8_codes():
    cache = KVCache(fp8_config(), device="cpu")
    seq = cache.add_sequence()
    slots = cache.append([seq], [6]).slot_mapping
    k = bf16_words(np.random.default_rng(2).standard_normal((6, 2, 8)))
    cache.write(0, k, k, slots)
    child = cache.fork(seq)
    step = cache.append([child], [1])         # the shared half-full page is copied
    assert step.copy_src.size == 1
    parent_raw, _, _ = cache.gather(0, [seq], raw=True)
    child_raw, _, _ = cache.gather(0, [child], raw=True)
    np.testing.assert_array_equal(child_raw[:6], parent_raw)


# -- key-only (MLA) pools -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_key_only_write_gather_copy_and_swap(dtype):
    cfg = fp8_config(dtype=dtype, num_kv_heads=1, head_dim=576, key_only=True,
                     num_host_pages=8)
    cache = KVCache(cfg, device="cpu")
    seq = cache.add_sequence()
    slots = cache.append([seq], [10]).slot_mapping
    latent = bf16_words(np.random.default_rng(3).standard_normal((10, 1, 576)))
    if cfg.quantized:
        cache.set_kv_scales(0, 0.01)
        assert cache.kv_scales(0) == (np.float32(0.01), None)
    cache.write(0, latent, None, slots)
    k, v, indptr = cache.gather(0, [seq])
    assert v is None and indptr.tolist() == [0, 10]
    want = (fp8.dequantize(fp8.quantize(latent, 0.01, "bfloat16"), 0.01, "bfloat16")
            if cfg.quantized else latent)
    np.testing.assert_array_equal(k, want)
    # copy-on-write of the shared last page, then a swap out and back in
    child = cache.fork(seq)
    cache.append([child], [1])
    np.testing.assert_array_equal(cache.gather(0, [child])[0][:10], want)
    cache.swap_out([seq])
    cache.wait()
    cache.swap_in([seq])
    cache.wait()
    np.testing.assert_array_equal(cache.gather(0, [seq])[0], want)
    cache.check_invariants()


def test_key_only_refuses_v_and_writes_nothing():
    cache = KVCache(fp8_config(dtype="bfloat16", key_only=True), device="cpu")
    seq = cache.add_sequence()
    slots = cache.append([seq], [2]).slot_mapping
    k = np.ones((2, 2, 8), np.uint16)
    before = cache.kv.copy()
    with pytest.raises(ShapeError, match="v must be None: the cache is key-only"):
        cache.write(0, k, k, slots)
    np.testing.assert_array_equal(cache.kv, before)
    with pytest.raises(ValueError, match="the cache is key-only"):
        cache.v_cache(0)
    with pytest.raises(ShapeError, match=r"out must be \(k_out, None\)"):
        cache.gather(0, [seq], out=(np.empty((2, 2, 8), np.uint16),) * 2)
    k_out = np.empty((2, 2, 8), np.uint16)
    cache.write(0, k, None, slots)
    got, none, _ = cache.gather(0, [seq], out=(k_out, None))
    assert got is k_out and none is None and (k_out == 1).all()


def test_k_and_v_pool_refuses_missing_v():
    cache = KVCache(fp8_config(dtype="bfloat16"), device="cpu")
    seq = cache.add_sequence()
    slots = cache.append([seq], [2]).slot_mapping
    before = cache.kv.copy()
    with pytest.raises(ShapeError, match=r"v is None, but the cache holds K and V"):
        cache.write(0, np.ones((2, 2, 8), np.uint16), None, slots)
    np.testing.assert_array_equal(cache.kv, before)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9)), min_size=1, max_size=12))
def test_key_only_pool_against_a_dict_model(ops):
    """Appends of random lengths to a few sequences, each token written once with a
    value naming it; gather must return exactly the model's tokens, in order."""
    cache = KVCache(fp8_config(dtype="float32", num_kv_heads=1, head_dim=3, key_only=True,
                               num_pages=64, max_pages_per_seq=64), device="cpu")
    seqs = [cache.add_sequence() for _ in range(4)]
    model = {s: [] for s in seqs}
    for which, count in ops:
        seq = seqs[which]
        slots = cache.append([seq], [count]).slot_mapping
        values = np.arange(len(model[seq]), len(model[seq]) + count, dtype=np.float32)
        k = np.repeat((values + 1000 * which)[:, None, None], 3, axis=2)
        cache.write(0, k, None, slots)
        model[seq].extend(k[:, 0, 0].tolist())
    k, v, indptr = cache.gather(0, seqs)
    assert v is None
    for b, seq in enumerate(seqs):
        np.testing.assert_array_equal(k[indptr[b]:indptr[b + 1], 0, 0], model[seq])


# -- kvcore simulate on an fp8 pool -------------------------------------------------------------

def test_simulate_verifies_an_fp8_pool_and_reports_tokens_per_gib():
    from kvcore.simulate import SimConfig, Simulator

    cfg = SimConfig(requests=12, pages=384, max_running=8, device="cpu", dtype=FP8_NAME,
                    page_size=8, system_prompt_len=40, seed=1, max_prompt_len=512,
                    max_output_len=256)
    result = Simulator(cfg).run()
    assert result.ok and result.requests_done == 12 and result.tokens_verified > 0
    assert result.tokens_per_gib == 2 * result.tokens_per_gib_bf16

    def corrupt(sim, step):
        if step == 20:
            seqs = sim.cache.table.active_seq_ids()
            page = int(sim.cache.pages(int(seqs[0]))[0])
            sim.cache.v_cache(1)[page, 0, 0, 0] ^= 1    # one code of one page

    result = Simulator(cfg, on_step=corrupt).run()
    assert result.mismatches >= 1 and not result.ok


# -- the CUDA quantizer's division-free path, replayed exactly -----------------------------

def _fma32(a, b, c):
    """float32 ``RN(a * b + c)`` with one rounding, as the GPU's ``fmaf``: ``a * b`` is
    exact in float64 (24 + 24 bits), the sum's float64 rounding error is recovered by
    TwoSum, and a float64 sum lying exactly half way between two float32 values is sent
    the way that error points (the only place a second rounding could go wrong)."""
    a, b, c = (np.asarray(t, dtype=np.float32).astype(np.float64) for t in (a, b, c))
    with np.errstate(over="ignore", invalid="ignore"):
        p = a * b
        s = p + c
        bb = s - p
        err = (p - (s - bb)) + (c - bb)
        r = s.astype(np.float32)
        # neighbours of s in float32, and whether s is exactly their midpoint
        lo = np.where(r.astype(np.float64) > s, np.nextafter(r, np.float32(-np.inf)), r)
        hi = np.nextafter(lo, np.float32(np.inf))
        midpoint = (lo.astype(np.float64) + hi.astype(np.float64)) / 2 == s
    fix = midpoint & (err != 0) & np.isfinite(s)
    return np.where(fix, np.where(err > 0, hi, lo), r).astype(np.float32)


def reciprocal_quantize(x32, scale):
    """cuda/kvcore_kernels.cu's ``scaled`` + ``e4m3x2`` for a scale that passes
    ``reciprocal_ok``: q0 = RN(x * RN(1 / s)), r = fma(-q0, s, x), q1 = fma(r, inv, q0)
    with x's sign (x = -0 gives r = +0 and q1 = +0), q0 itself once |q0| >= 440, then the
    saturating conversion (NaN -> 0x7F)."""
    s = np.float32(scale)
    inv = np.float32(1) / s
    with np.errstate(over="ignore", invalid="ignore"):
        q0 = (x32 * inv).astype(np.float32)
        r = _fma32(-q0, s, x32)
        q1 = _fma32(r, inv, q0)
        y = np.where(np.abs(q0) < np.float32(440), np.copysign(q1, x32), q0)
    return fp8._round_to_e4m3(y)


RECIPROCAL_SCALES = [*SCALES[:5], 2.0**-90, np.nextafter(np.float32(2.0**125), np.float32(0)),
                     1 / 448, 3.0, 0.1, 7e-20, 6.02e30]


@pytest.mark.parametrize("scale", RECIPROCAL_SCALES
                         + list(np.exp2(np.random.default_rng(16).uniform(-90, 125, 40))))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reciprocal_path_equals_the_division_on_every_input(dtype, scale):
    """The GPU quantizes with a reciprocal and one correction step (where the scale
    allows it); replayed with exact float32 steps it gives the division's codes for all
    65,536 inputs."""
    s = np.float32(scale)
    assert 2.0**-90 <= s < 2.0**125                  # reciprocal_ok in the kernel
    words = ALL_WORDS if dtype == "bfloat16" else ALL_WORDS.view(np.float16)
    x32 = fp8._as_float32(words, dtype)
    np.testing.assert_array_equal(reciprocal_quantize(x32, s), fp8.quantize(words, s, dtype))


def test_fma32_rounds_once():
    # 1 + 2**-24 is half way between 1 and 1 + 2**-23; the tiny addend decides
    a, b = np.float32(1 + 2.0**-23), np.float32(1 - 2.0**-23)   # a * b = 1 - 2**-46
    assert _fma32(a, b, np.float32(2.0**-24)) == np.float32(1.0)
    assert _fma32(np.float32(1), np.float32(2.0**-24), np.float32(1)) == np.float32(1)
    assert _fma32(np.float32(1 + 2.0**-23), np.float32(2.0**-24),
                  np.float32(1)) == np.float32(1 + 2.0**-23)


# -- the kernels' arithmetic as CuPy compiles it (-ftz=true), replayed ------------------------

def _flush(a):
    """Subnormal float32 values to a zero of their sign, as ``.ftz`` instructions do."""
    a = np.asarray(a, dtype=np.float32)
    tiny = (np.abs(a) < np.float32(2.0**-126)) & (a != 0)
    return np.where(tiny, np.copysign(np.float32(0), a), a).astype(np.float32)


def ftz_quantize(x32, scale):
    """cuda/kvcore_kernels.cu's quantizer with every compiler-made float instruction
    flushing subnormal inputs and results (CuPy appends ``-ftz=true``); the inline-PTX
    conversion and the bit operations (copysign, the NaN test) do not flush."""
    s = _flush(np.broadcast_to(np.asarray(scale, dtype=np.float32), x32.shape))
    xf = _flush(x32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        inv = _flush(np.float32(1) / s)
        q0 = _flush(xf * inv)
        r = _flush(_fma32(-q0, s, xf))
        q1 = _flush(_fma32(r, inv, q0))
        by_reciprocal = np.where(np.abs(q0) < np.float32(440), np.copysign(q1, x32), q0)
        by_division = _flush(xf / s)
    y = np.where((s >= np.float32(2.0**-90)) & (s < np.float32(2.0**125)), by_reciprocal,
                 by_division)
    return np.where(np.isnan(x32), np.uint8(fp8.E4M3_NAN), fp8._round_to_e4m3(y))


def ftz_token_head_scales(x32):
    """The per-(token, head) scale under ``-ftz=true``: amax of flushed values, a flushed
    quotient, 1.0 below MIN_SCALE."""
    xf = _flush(x32)
    nan = np.isnan(xf).any(axis=2)
    amax = np.max(np.abs(np.where(np.isnan(xf), np.float32(0), xf)), axis=2)
    with np.errstate(over="ignore"):
        q = _flush(amax / np.float32(448))
    keep = ~nan & (q >= np.float32(fp8.MIN_SCALE)) & np.isfinite(q)
    return np.where(keep, q, np.float32(1)).astype(np.float32)


FTZ_SCALES = [1.0, 0.0173, 3.7, 2.0**-10, 1e-30, 6.02e30, 2.0**-116, 1.3e-35, 2.0**-100,
              3e37]


@pytest.mark.parametrize("scale", FTZ_SCALES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_flushing_subnormals_changes_no_code_from_min_scale_up(dtype, scale):
    """Every input at scales >= MIN_SCALE: the kernel's arithmetic with subnormals
    flushed gives quantize's codes, and dequantizing every code with the product
    flushed gives dequantize's words."""
    assert scale >= fp8.MIN_SCALE
    words = ALL_WORDS if dtype == "bfloat16" else ALL_WORDS.view(np.float16)
    x32 = fp8._as_float32(words, dtype)
    np.testing.assert_array_equal(ftz_quantize(x32, scale), fp8.quantize(words, scale, dtype))
    codes = np.arange(256, dtype=np.uint8)
    with np.errstate(over="ignore"):
        products = _flush(fp8.e4m3_to_float32(codes) * np.float32(scale))
    if dtype == "bfloat16":
        flushed = fp8.float32_to_bfloat16(products)
    else:
        with np.errstate(over="ignore"):
            flushed = products.astype(np.float16)
        flushed[np.isnan(products)] = np.uint16(0x7E00).view(np.float16)
    want = fp8.dequantize(codes, scale, dtype)
    np.testing.assert_array_equal(flushed.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_flushing_subnormals_changes_no_token_head_scale_or_code(dtype, order):
    """All 65,536 inputs in rows of 64 (the CUDA test's arrangement): flushed or not,
    the same scales and the same codes. A scale below MIN_SCALE would differ (the rows
    of bfloat16 subnormals: 2**-133 .. 2**-126, whose amax / 448 is itself subnormal)."""
    words = ALL_WORDS.copy()
    if order == "shuffled":
        words = np.random.default_rng(7).permutation(words)
    words = words.reshape(512, 2, 64)
    if dtype == "float16":
        words = words.view(np.float16)
    x32 = fp8._as_float32(words, dtype)
    scales = fp8.token_head_scales(words, dtype)
    np.testing.assert_array_equal(ftz_token_head_scales(x32), scales)
    np.testing.assert_array_equal(ftz_quantize(x32, scales[:, :, None]),
                                  fp8.quantize(words, scales[:, :, None], dtype))

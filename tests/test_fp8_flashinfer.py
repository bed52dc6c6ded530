"""Real clients of fp8 and MLA pools on the GPU: FlashInfer's batch decode reads a kvcore
fp8 pool with kvcore's scales (and misses its float32 reference with a wrong scale);
FlashInfer's MLA decode (or, where it refuses strided views, a torch reader) reads a
576-wide key-only pool. The checks live in kvcore/bench/fp8.py, which also records their
figures. Skipped without a GPU or FlashInfer."""

import importlib.util
import warnings

import pytest

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None,
                                 reason="needs FlashInfer (flashinfer-python)")]

#: Largest |FlashInfer - reference| / max |reference| accepted: bfloat16 output rounding
#: (2**-9 relative) plus float32 accumulation in another order, with room to spare; a
#: wrong scale misses by far more (tens of percent).
TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def fi():
    import flashinfer

    return flashinfer


@pytest.fixture(scope="module")
def bench():
    from kvcore.bench import fp8 as bench_fp8

    return bench_fp8


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_flashinfer_decode_reads_the_fp8_pool_with_kvcores_scales(fi, bench, layout):
    result = bench.decode_check(fi, layout=layout)
    assert result["max_rel_err"] < TOLERANCE, result


@pytest.mark.parametrize(("k_factor", "v_factor"), [(4.0, 1.0), (1.0, 1.5), (1.0, 0.5)])
def test_a_wrong_scale_misses_the_reference(fi, bench, k_factor, v_factor):
    """The check above has teeth: the same comparison fails with a wrong scale."""
    result = bench.decode_check(fi, k_factor=k_factor, v_factor=v_factor)
    assert result["max_rel_err"] > 5 * TOLERANCE, result


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_mla_decode_reads_the_key_only_pool(fi, bench, dtype):
    result = bench.mla_check(fi, dtype)
    if "flashinfer_error" in result:
        warnings.warn(f"FlashInfer's MLA decode refused the pool: "
                      f"{result['flashinfer_error']}; read by the torch reference",
                      stacklevel=1)
        assert result["torch_reader_matches_gather"], result
    else:
        assert result["max_rel_err"] < TOLERANCE, result

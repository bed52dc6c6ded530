"""The kernels' argument lists, written once.

Each entry mirrors an ``extern "C"`` entry point ``kvcore_<op>_w<bytes>`` of
``cuda/kvcore_kernels.cu`` name by name; ``tests/test_kernel_abi.py`` parses the CUDA
source and fails if the two disagree. Kinds: ``p`` a device pointer, ``q`` a 64-bit
integer (``long long``), ``i`` a 32-bit integer (``int``).

Arguments are split in two: the *leading* ones change with every call (array pointers,
strides, counts); the *bound* ones are fixed for one cache and one vector width, so a
launcher stores them once (see :class:`kvcore._launch.KernelLauncher`).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["FP8_OPS", "FP8_WIDTHS", "KERNELS", "KernelABI", "VECTOR_WIDTHS"]


class KernelABI(NamedTuple):
    """Argument list of one kernel: ``leading`` per call, then ``bound`` per cache."""

    leading: tuple[tuple[str, str], ...]
    bound: tuple[tuple[str, str], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.leading + self.bound)

    @property
    def kinds(self) -> str:
        """One letter per argument, in order (``p`` / ``q`` / ``i``)."""
        return "".join(kind for _, kind in self.leading + self.bound)

    @property
    def bound_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.bound)


KERNELS: dict[str, KernelABI] = {
    "scatter": KernelABI(
        leading=(("k", "p"), ("v", "p"), ("k_stride_t", "q"), ("k_stride_h", "q"),
                 ("v_stride_t", "q"), ("v_stride_h", "q"), ("slot_mapping", "p"),
                 ("k_pool", "p"), ("v_pool", "p"), ("num_tokens", "q")),
        bound=(("num_slots", "q"), ("page_stride", "q"), ("layout", "i"), ("page_size", "q"),
               ("page_shift", "i"), ("num_heads", "q"), ("row_vecs", "q"),
               ("error_word", "p")),
    ),
    "gather": KernelABI(
        leading=(("k_pool", "p"), ("v_pool", "p"), ("page_indptr", "p"), ("page_indices", "p"),
                 ("last_page_len", "p"), ("token_indptr", "p"), ("k_out", "p"), ("v_out", "p"),
                 ("batch", "i"), ("out_rows", "q")),
        bound=(("num_pages", "q"), ("page_stride", "q"), ("layout", "i"), ("page_size", "q"),
               ("num_heads", "q"), ("row_vecs", "q"), ("error_word", "p")),
    ),
    "copy_pages": KernelABI(
        leading=(("pools", "p"), ("src", "p"), ("dst", "p"), ("num_pairs", "q")),
        bound=(("num_pools", "q"), ("num_pages", "q"), ("page_stride", "q"), ("page_vecs", "q"),
               ("error_word", "p")),
    ),
    "swap_pages": KernelABI(
        leading=(("device_pages", "p"), ("host_pages", "p"), ("num_pairs", "q"),
                 ("to_host", "i")),
        bound=(("pools", "p"), ("host_pool", "p"), ("num_pools", "q"), ("num_pages", "q"),
               ("num_host_pages", "q"), ("page_stride", "q"), ("page_vecs", "q"),
               ("error_word", "p")),
    ),
    # fp8 pools: quantize float16 / bfloat16 on the way in, dequantize on the way out.
    # Widths count fp8 codes per vector (FP8_WIDTHS); offsets and strides are in elements.
    "scatter_fp8": KernelABI(
        leading=(("k", "p"), ("v", "p"), ("k_stride_t", "q"), ("k_stride_h", "q"),
                 ("v_stride_t", "q"), ("v_stride_h", "q"), ("slot_mapping", "p"),
                 ("k_pool", "p"), ("v_pool", "p"), ("scales", "p"), ("num_tokens", "q")),
        bound=(("num_slots", "q"), ("page_stride", "q"), ("layout", "i"), ("page_size", "q"),
               ("page_shift", "i"), ("num_heads", "q"), ("head_dim", "q"), ("bf16", "i"),
               ("error_word", "p")),
    ),
    "gather_fp8": KernelABI(
        leading=(("k_pool", "p"), ("v_pool", "p"), ("page_indptr", "p"), ("page_indices", "p"),
                 ("last_page_len", "p"), ("token_indptr", "p"), ("k_out", "p"), ("v_out", "p"),
                 ("scales", "p"), ("k_scale_pool", "p"), ("v_scale_pool", "p"), ("batch", "i"),
                 ("out_rows", "q")),
        bound=(("num_pages", "q"), ("page_stride", "q"), ("layout", "i"), ("page_size", "q"),
               ("num_heads", "q"), ("head_dim", "q"), ("bf16", "i"), ("error_word", "p")),
    ),
    # fp8 pools with per-(token, head) scales: the write computes each row's scale and
    # stores it in the side pool (the gather reads it through gather_fp8's scale pools).
    "scatter_fp8_th": KernelABI(
        leading=(("k", "p"), ("v", "p"), ("k_stride_t", "q"), ("k_stride_h", "q"),
                 ("v_stride_t", "q"), ("v_stride_h", "q"), ("slot_mapping", "p"),
                 ("k_pool", "p"), ("v_pool", "p"), ("k_scale_pool", "p"), ("v_scale_pool", "p"),
                 ("num_tokens", "q")),
        bound=(("num_slots", "q"), ("page_stride", "q"), ("layout", "i"), ("page_size", "q"),
               ("page_shift", "i"), ("num_heads", "q"), ("head_dim", "q"), ("bf16", "i"),
               ("error_word", "p")),
    ),
}

#: Vector widths in bytes, one entry point per width (``kvcore_<op>_w<bytes>``); 1 serves
#: fp8 pools whose rows or pointers are odd.
VECTOR_WIDTHS = (16, 8, 4, 2, 1)

#: fp8 codes per vector of ``scatter_fp8`` / ``gather_fp8`` (``kvcore_<op>_w<codes>``).
FP8_WIDTHS = (8, 4, 2, 1)

#: The kernels instantiated at FP8_WIDTHS; the others are at VECTOR_WIDTHS.
FP8_OPS = ("scatter_fp8", "gather_fp8", "scatter_fp8_th")

#: Bits of the device error word (cuda/kvcore_common.cuh).
ERR_SLOT_OUT_OF_RANGE = 1
ERR_PAGE_OUT_OF_RANGE = 2
ERR_OUTPUT_TOO_SMALL = 4

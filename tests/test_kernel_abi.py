"""The kernels' argument lists in kvcore/backends/kernel_abi.py match cuda/*.cu, name by
name and kind by kind (the CUDA source is parsed; no GPU needed)."""

import re
from pathlib import Path

import pytest

from kvcore.backends.kernel_abi import FP8_WIDTHS, KERNELS, VECTOR_WIDTHS

SOURCE = Path(__file__).resolve().parent.parent / "cuda" / "kvcore_kernels.cu"


def entry_points():
    text = SOURCE.read_text().replace("\\\n", "\n")
    found = {}
    pattern = r'extern "C" __global__ void kvcore_(\w+)_w##BYTES\(([^)]*)\)'
    for op, params in re.findall(pattern, text):
        args = []
        for param in params.split(","):
            param = " ".join(param.split())
            name = re.findall(r"(\w+)$", param)[0]
            if "*" in param:
                kind = "p"
            elif param.startswith("long long"):
                kind = "q"
            elif param.startswith("int "):
                kind = "i"
            else:
                raise AssertionError(f"unexpected parameter type in {op}: {param}")
            args.append((name, kind))
        found[op] = args
    return found


def test_every_kernel_is_described():
    assert set(entry_points()) == set(KERNELS)


@pytest.mark.parametrize("op", sorted(KERNELS))
def test_argument_lists_agree(op):
    abi = KERNELS[op]
    assert entry_points()[op] == list(abi.leading + abi.bound)


def test_every_width_is_instantiated():
    text = SOURCE.read_text()
    widths = sorted(int(w) for w in re.findall(r"KVCORE_INSTANTIATE\(\w+(?: \w+)?, (\d+)\)",
                                                   text))
    assert widths == sorted(VECTOR_WIDTHS)
    fp8 = sorted(int(w) for w in re.findall(r"KVCORE_INSTANTIATE_FP8\((\d+)\)", text))
    assert fp8 == sorted(FP8_WIDTHS)


def test_error_bits_agree_with_the_cuda_header():
    from kvcore.backends import kernel_abi

    header = (SOURCE.parent / "kvcore_common.cuh").read_text()
    bits = dict(re.findall(r"#define KVCORE_(ERR_\w+) (\d+)", header))
    assert bits and {k: int(v) for k, v in bits.items()} == {
        name: getattr(kernel_abi, name) for name in bits}

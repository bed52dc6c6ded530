"""Benchmarks shipped with kvcore (``kvcore bench``; scripts in ``benchmarks/`` call these).

``host``: the Cython core against a pure-Python baseline (``pure_python``), any machine.
``device``: the CUDA kernels against the copy ceiling and torch, needs CuPy and a GPU.
"""

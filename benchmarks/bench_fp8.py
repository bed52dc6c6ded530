"""fp8 / MLA benchmark and FlashInfer checks (see kvcore/bench/fp8.py); needs torch,
CuPy and a GPU (FlashInfer optional)."""

from kvcore.bench.fp8 import main

if __name__ == "__main__":
    raise SystemExit(main())

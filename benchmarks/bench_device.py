"""Device benchmark (see kvcore/bench/device.py); needs CuPy and a GPU."""

from pathlib import Path

from kvcore.bench.device import main

if __name__ == "__main__":
    raise SystemExit(main(default_out=Path(__file__).resolve().parent / "results" / "h200.json"))

"""Host bookkeeping benchmark (see kvcore/bench/host.py); writes results/cpu.json."""

from pathlib import Path

from kvcore.bench.host import main

if __name__ == "__main__":
    raise SystemExit(main(default_out=Path(__file__).resolve().parent / "results" / "cpu.json"))

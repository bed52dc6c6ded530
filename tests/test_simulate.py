"""kvcore simulate / bench / info, and the simulator's integrity check."""

import json
import subprocess
import sys

import numpy as np
import pytest

from kvcore.simulate import ConfigurationError, SimConfig, Simulator, token_words

SMALL = ["--requests", "24", "--pages", "512", "--max-running", "16", "--quiet"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kvcore", *args], capture_output=True,
                          text=True, timeout=300)


def test_simulate_cli_runs_clean(tmp_path):
    out = tmp_path / "sim.json"
    proc = run_cli("simulate", *SMALL, "--device", "cpu", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("integrity: ") and ", 0 mismatches, 0 invariant failures" in last
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["requests_done"] == 24
    assert data["tokens_verified"] > 0 and data["mismatches"] == 0
    # one timeline entry per step run; idle stretches are skipped
    assert len(data["timeline"]["step"]) == data["steps"] - data["idle_steps"]
    assert 0 <= data["spot_checks"] <= data["sequences_verified"]


def test_corruption_behind_kvcores_back_is_caught():
    def corrupt(sim, step):
        if step == 20:
            seqs = sim.cache.table.active_seq_ids()
            page = int(sim.cache.pages(int(seqs[0]))[0])
            sim.cache.v_cache(1)[page, 0, 0, 0] += 1   # one element of one page

    cfg = SimConfig(requests=16, pages=512, max_running=16, device="cpu", seed=3)
    result = Simulator(cfg, on_step=corrupt).run()
    assert result.mismatches >= 1 and not result.ok


def test_corruption_makes_the_cli_fail():
    proc = run_cli("simulate", *SMALL, "--device", "cpu", "--corrupt-at-step", "15")
    assert proc.returncode == 1
    assert "0 mismatches" not in proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(("dtype", "layout"), [("bfloat16", "HND"), ("float32", "NHD")])
def test_simulator_other_dtypes_and_layouts(dtype, layout):
    cfg = SimConfig(requests=12, pages=384, max_running=8, device="cpu", dtype=dtype,
                    layout=layout, page_size=8, system_prompt_len=40, seed=1,
                    max_prompt_len=1024, max_output_len=512)
    result = Simulator(cfg).run()
    assert result.ok and result.requests_done == 12 and result.tokens_verified > 0


def test_preemption_and_copy_on_write_happen_and_verify():
    cfg = SimConfig(requests=40, pages=300, max_running=24, device="cpu", seed=2,
                    multi_sample_share=0.5, max_prompt_len=512, max_output_len=256,
                    system_prompt_len=64)
    result = Simulator(cfg).run()
    assert result.ok
    assert result.preemptions > 0 and result.cow_copies > 0


def test_a_request_longer_than_the_pool_is_reported():
    with pytest.raises(ConfigurationError, match="needs 208 pages of 16 tokens, but the pool"):
        Simulator(SimConfig(pages=100, device="cpu"))
    proc = run_cli("simulate", "--pages", "100", "--device", "cpu")
    assert proc.returncode == 2
    assert "raise --pages" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags", [["--requests", "0"], ["--dtype", "int8"],
                                   ["--arrival-rate", "-1"], ["--system-prompt-share", "2"],
                                   ["--device-typo", "cpu"]])
def test_bad_flags_are_argparse_errors(flags):
    proc = run_cli("simulate", *flags)
    assert proc.returncode == 2
    # one line, argparse-style, naming the option (no usage block: see tests/test_cli.py)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("kvcore simulate: error: ")
    assert flags[0] in proc.stderr


def test_unknown_device_is_reported():
    proc = run_cli("simulate", *SMALL, "--device", "tpu")
    assert proc.returncode == 2 and "device must be" in proc.stderr


def test_token_words_are_deterministic_finite_and_distinct():
    a = token_words([1, 1, 2], [0, 1, 0], [5, 5, 5], layer=0, which=0, num_heads=2,
                    head_dim=8, itemsize=2)
    b = token_words([1, 1, 2], [0, 1, 0], [5, 5, 5], layer=0, which=0, num_heads=2,
                    head_dim=8, itemsize=2)
    assert a.dtype == np.uint16 and a.shape == (3, 2, 8)
    np.testing.assert_array_equal(a, b)
    assert len({row.tobytes() for row in a}) == 3
    assert np.isfinite(a.view(np.float16)).all()
    c = token_words([1], [0], [5], layer=0, which=1, num_heads=2, head_dim=8, itemsize=4)
    assert c.dtype == np.uint32 and np.isfinite(c.view(np.float32)).all()


def test_info_runs():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    assert "extension        compiled" in proc.stdout and "kernel sources" in proc.stdout


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sim.png"
    proc = run_cli("simulate", *SMALL, "--device", "cpu", "--plot", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 1000


def test_prefix_cache_hits_and_can_be_turned_off():
    cfg = SimConfig(requests=40, pages=1024, max_running=16, device="cpu", seed=4,
                    system_prompt_share=1.0, system_prompts=1, max_prompt_len=256)
    on = Simulator(cfg).run()
    assert on.ok and on.prefix_hit_rate > 0.3 and on.prefix_hit_tokens > 0
    off = Simulator(SimConfig(**{**cfg.__dict__, "prefix_cache": False})).run()
    assert off.ok and off.prefix_hit_rate is None
    assert off.tokens_written > on.tokens_written   # hits are not written again

"""kvcore simulate --preempt swap: preemption to the host tier, verified byte for byte."""

import json
import subprocess
import sys

import numpy as np
import pytest

from kvcore.simulate import ConfigurationError, SimConfig, Simulator

# small enough to preempt a dozen times in about half a second
TIGHT = dict(requests=24, pages=160, max_running=24, device="cpu", seed=2,
             multi_sample_share=0.5, max_prompt_len=384, max_output_len=192,
             system_prompt_len=64, head_dim=32)
HYBRID = dict(requests=16, pages=200, max_running=16, device="cpu", layers=4, page_size=8,
              max_prompt_len=512, max_output_len=256, system_prompt_len=64, seed=5)
TIGHT_FLAGS = ["--requests", "24", "--pages", "160", "--max-running", "24", "--seed", "2",
               "--multi-sample-share", "0.5", "--max-prompt-len", "384", "--max-output-len",
               "192", "--system-prompt-len", "64", "--head-dim", "32", "--device", "cpu",
               "--quiet"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kvcore", *args], capture_output=True,
                          text=True, timeout=120)


def assert_every_page_came_back(result):
    swap = result.swap
    assert result.ok, (result.mismatches, result.invariant_failures)
    assert swap["swap_outs"] > 0 and swap["swap_ins"] > 0
    assert swap["requests_swapped_in"] == swap["swap_outs"]   # each came back once
    assert swap["bytes_out"] == swap["bytes_in"] > 0
    assert swap["pages_out"] == swap["pages_in"] > 0
    assert swap["pending_at_end"] == 0 and swap["failed_transfers"] == 0
    assert swap["checks"] > 0 and swap["mismatches"] == 0
    assert swap["out_gb_per_s"] > 0 and swap["in_gb_per_s"] > 0
    assert 0 < swap["host_pages_peak"] <= swap["host_pages"]


def test_swap_preemption_brings_every_page_back_intact():
    sim = Simulator(SimConfig(**TIGHT, preempt="swap"))
    total_samples = sum(len(r.output_lens) for r in sim.requests)
    result = sim.run()
    assert_every_page_came_back(result)
    swap = result.swap
    assert swap["recompute_fallbacks"] == 0 and result.recompute_tokens == 0
    assert swap["recompute_tokens_avoided"] > 0
    assert result.preemptions == swap["swap_outs"]
    assert (result.requests_done, result.samples_done) == (24, total_samples)
    # the default host tier is as large as the pool, and the config reports it
    assert swap["host_pages"] == 160 and result.config["host_pages"] == 160
    assert result.config["preempt"] == "swap"
    assert max(result.timeline["swapped"]) > 0
    # the host tier also caches evicted prefix pages (kvcore's offloads, not swaps); this
    # workload hits it, and the admission that does waits for the load
    assert swap["prefix_offloads"] > 0 and swap["prefix_loads"] > 0
    # every sequence checked after a swap-in is counted among the read-backs
    assert result.sequences_verified >= total_samples + result.spot_checks + swap["checks"]


@pytest.mark.parametrize("extra", [dict(window=40, speculative=3), dict(speculative=3),
                                   dict(window=40)])
def test_swap_with_windows_and_speculative_decoding(extra):
    result = Simulator(SimConfig(**HYBRID, **extra, preempt="swap")).run()
    assert_every_page_came_back(result)
    if result.hybrid is not None:
        assert result.hybrid["problems"] == [] and result.hybrid["window_bound_violations"] == 0
    if result.speculative is not None:
        assert result.speculative["rejected_hits"] == 0


@pytest.mark.parametrize(("dtype", "layout"), [("bfloat16", "HND"), ("float32", "NHD")])
def test_swap_with_other_dtypes_and_layouts(dtype, layout):
    result = Simulator(SimConfig(**{**TIGHT, "requests": 16}, dtype=dtype, layout=layout,
                                 preempt="swap")).run()
    assert_every_page_came_back(result)


def test_a_host_tier_too_small_falls_back_to_recompute():
    result = Simulator(SimConfig(**TIGHT, preempt="swap", host_pages=24)).run()
    assert_every_page_came_back(result)
    swap = result.swap
    assert swap["recompute_fallbacks"] > 0
    assert result.preemptions == swap["swap_outs"] + swap["recompute_fallbacks"]
    assert result.recompute_tokens > 0 and swap["recompute_tokens"] == result.recompute_tokens
    assert swap["host_pages_peak"] <= 24


def test_no_host_tier_is_exactly_recompute():
    recompute = Simulator(SimConfig(**TIGHT)).run()
    none = Simulator(SimConfig(**TIGHT, preempt="swap", host_pages=0)).run()
    assert none.ok and none.swap["swap_outs"] == 0
    assert none.swap["recompute_fallbacks"] == none.preemptions == recompute.preemptions > 0
    for name in ("steps", "tokens_written", "recompute_tokens", "tokens_verified",
                 "samples_done", "cow_copies", "prefix_hit_tokens"):
        assert getattr(none, name) == getattr(recompute, name), name


def test_recompute_is_unchanged():
    """The figures a --preempt recompute run (the default) had before --preempt existed."""
    cfg = SimConfig(requests=40, pages=300, max_running=24, device="cpu", seed=2,
                    multi_sample_share=0.5, max_prompt_len=512, max_output_len=256,
                    system_prompt_len=64)
    result = Simulator(cfg).run()
    assert result.ok and result.swap is None
    assert (result.steps, result.preemptions, result.tokens_written, result.samples_done,
            result.cow_copies, result.prefix_hit_tokens) == (617, 13, 20194, 73, 41, 61008)
    assert result.recompute_tokens == 5939
    assert not {"preempt", "host_pages"} & set(result.config)
    assert "swapped" not in result.timeline


def test_a_corrupted_host_page_is_caught_after_the_swap_in():
    """One host page changed while its sequence waits on the host: the check after its
    swap-in must count it."""
    corrupted = []

    def corrupt(sim, step):
        if corrupted:
            return
        for request in sim._swapped:
            seq = next(s for s in request.seq_ids if s >= 0)
            if sim.cache.seq_state(seq) == "swapped":
                page = int(sim.cache.table.host_pages(seq)[0])
                host = sim.cache.host_kv
                host[page, 0, 0] = (host[page, 0, 0].view(np.uint16) ^ 1).view(host.dtype)
                corrupted.append((step, request.request_id))
                return

    result = Simulator(SimConfig(**TIGHT, preempt="swap"), on_step=corrupt).run()
    assert corrupted
    assert result.swap["mismatches"] >= 1 and result.mismatches >= result.swap["mismatches"]
    assert not result.ok


@pytest.mark.parametrize(("changes", "needle"), [
    ({"preempt": "evict"}, "--preempt must be one of recompute, swap"),
    ({"host_pages": 8, "prefix_cache": False},
     "--host-pages with --preempt recompute needs --prefix-cache"),
    ({"preempt": "swap", "host_pages": -1}, "--host-pages must be an integer"),
    ({"preempt": "swap", "host_pages": 2.5}, "--host-pages must be an integer"),
])
def test_bad_preempt_configs_are_reported(changes, needle):
    with pytest.raises(ConfigurationError, match=needle):
        Simulator(SimConfig(**{**TIGHT, **changes}))


def test_cli_swap_summary_and_json(tmp_path):
    out = tmp_path / "swap.json"
    proc = run_cli("simulate", *TIGHT_FLAGS, "--preempt", "swap", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("swapped out ") and "GB/s" in line for line in lines)
    assert any(line.startswith("recompute avoided ") for line in lines)
    assert "checks after swap-in), " in lines[-1] and ", 0 mismatches," in lines[-1]
    data = json.loads(out.read_text())
    assert data["ok"] and data["swap"]["bytes_out"] == data["swap"]["bytes_in"] > 0


def test_cli_both_compares_the_two_runs(tmp_path):
    out = tmp_path / "both.json"
    proc = run_cli("simulate", *TIGHT_FLAGS, "--preempt", "both", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.index("--preempt recompute") < text.index("--preempt swap")
    assert text.count("integrity: ") == 2
    comparison = text.split("swap against recompute")[1]
    assert "tokens to recompute" in comparison and "avoided by swapping" in comparison
    data = json.loads(out.read_text())
    assert data["ok"] is True
    assert "swap" not in data["recompute"] and data["swap"]["swap"]["swap_outs"] > 0
    assert data["recompute"]["recompute_tokens"] > 0 == data["swap"]["recompute_tokens"]


@pytest.mark.parametrize(("flags", "needle"), [
    (["--host-pages", "8", "--no-prefix-cache"],
     "--host-pages with --preempt recompute needs --prefix-cache"),
    (["--preempt", "evict"], "--preempt must be one of recompute, swap, both"),
    (["--preempt", "both", "--plot", "x.png"], "--plot draws one run"),
])
def test_cli_rejects_bad_preempt_flags(flags, needle):
    proc = run_cli("simulate", *TIGHT_FLAGS, *flags)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr

"""kvcore simulate with a host tier that serves prefix offload: --preempt recompute
--host-pages N (victims recomputed, evicted prefix pages offloaded and loaded back), and
--preempt both with the same host tier in both runs."""

import json
import subprocess
import sys

import numpy as np
import pytest

from kvcore.simulate import ConfigurationError, SimConfig, Simulator

# a dozen system prompts of 4 pages each, on a pool of 96 pages that prompts and outputs
# crowd: cached system prompts are evicted, and later requests ask for them again
OFFLOAD = dict(requests=40, pages=96, max_running=24, device="cpu", head_dim=32, seed=0,
               multi_sample_share=0.2, max_prompt_len=256, max_output_len=128,
               prompt_median=64, output_median=48, system_prompts=12, system_prompt_len=64,
               system_prompt_share=0.9)
OFFLOAD_FLAGS = ["--requests", "40", "--pages", "96", "--max-running", "24", "--head-dim",
                 "32", "--seed", "0", "--multi-sample-share", "0.2", "--max-prompt-len",
                 "256", "--max-output-len", "128", "--prompt-median", "64",
                 "--output-median", "48", "--system-prompts", "12", "--system-prompt-len",
                 "64", "--system-prompt-share", "0.9", "--device", "cpu", "--quiet"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kvcore", *args], capture_output=True,
                          text=True, timeout=120)


def assert_offload_figures(result, host_pages):
    offload = result.prefix_offload
    assert result.ok, (result.mismatches, result.invariant_failures)
    assert offload["host_pages"] == host_pages
    assert offload["offloads"] > 0 and offload["offload_pages"] >= offload["offloads"]
    assert offload["loads"] > 0 and offload["load_pages"] >= offload["loads"]
    # every load was an admission's hit, waited for at once
    assert offload["admission_waits"] == offload["loads"]
    assert offload["failed_transfers"] == 0 and offload["pending_at_end"] == 0
    # kvcore's own counts agree with the transfers the simulator saw complete
    assert offload["kvcore_offloaded"] == offload["offload_pages"]
    assert offload["kvcore_loaded"] == offload["load_pages"]
    assert 0 < offload["host_cached_pages"] <= host_pages
    page_bytes = offload["host_bytes"] // host_pages
    assert offload["offload_bytes"] == offload["offload_pages"] * page_bytes
    assert offload["load_bytes"] == offload["load_pages"] * page_bytes
    assert 0 < offload["admitted_host_hit_tokens"] <= result.admitted_hit_tokens
    # each load is an admission's: admitted, or rolled back (its blocks stay on the device)
    page_size = result.config["page_size"]
    assert offload["admitted_host_hit_tokens"] % page_size == 0
    assert (offload["admitted_host_hit_tokens"] // page_size
            + offload["load_pages_rolled_back"]) == offload["load_pages"]
    assert offload["loads_rolled_back"] <= offload["loads"]


def test_recompute_with_a_host_tier_loads_offloaded_prefixes_back_intact():
    plain = Simulator(SimConfig(**OFFLOAD)).run()
    result = Simulator(SimConfig(**OFFLOAD, host_pages=256)).run()
    assert_offload_figures(result, 256)
    assert result.mismatches == 0 and result.invariant_failures == 0
    # victims are still recomputed: no swap figures, no swapped requests
    assert result.swap is None and "swapped" not in result.timeline
    assert result.preemptions > 0 and result.recompute_tokens > 0
    assert result.config["host_pages"] == 256 and "preempt" not in result.config
    # the host tier serves prompt tokens that the run without it computed again
    assert plain.prefix_offload is None and plain.ok
    assert result.admitted_hit_tokens > plain.admitted_hit_tokens
    assert result.prefill_tokens < plain.prefill_tokens
    assert result.tokens_written < plain.tokens_written


def test_admitted_prompt_tokens_are_hits_plus_prefill():
    """Without preemption every prompt is admitted once: the admitted prompt tokens are
    the prompts' tokens, whatever the prefix cache served."""
    cfg = dict(OFFLOAD, pages=400, host_pages=64)
    sim = Simulator(SimConfig(**cfg))
    prompts = sum(r.prompt_len for r in sim.requests)
    result = sim.run()
    assert result.ok and result.preemptions == 0
    assert result.admitted_hit_tokens + result.prefill_tokens == prompts
    plain = Simulator(SimConfig(**{**cfg, "host_pages": None})).run()
    assert plain.admitted_hit_tokens + plain.prefill_tokens == prompts


def test_a_corrupted_host_page_is_caught_after_its_load():
    """Flip a bit in every host page once offloads have filled some: a prefix hit loaded
    from one of them brings the change to the device, and the read-backs count it."""
    flipped = []

    def corrupt(sim, step):
        if flipped or sim.cache.prefix_stats["host_cached_pages"] < 16:
            return
        host = sim.cache.host_kv
        host[:, 0, 0] = (host[:, 0, 0].view(np.uint16) ^ 1).view(host.dtype)
        flipped.append(step)

    result = Simulator(SimConfig(**OFFLOAD, host_pages=256), on_step=corrupt).run()
    assert flipped and result.prefix_offload["loads"] > 0
    assert result.mismatches > 0 and not result.ok


def test_recompute_without_a_host_tier_reports_no_offload():
    result = Simulator(SimConfig(**OFFLOAD, host_pages=0)).run()
    assert result.ok and result.prefix_offload is None and result.swap is None
    assert result.config["host_pages"] == 0   # given, so reported


def test_swap_reports_the_same_offload_figures():
    result = Simulator(SimConfig(**OFFLOAD, preempt="swap", host_pages=256)).run()
    assert result.ok
    offload, swap = result.prefix_offload, result.swap
    for kind in ("offload", "load"):
        for suffix in ("s", "_pages", "_bytes"):
            assert swap[f"prefix_{kind}{suffix}"] == offload[f"{kind}{suffix}"]


@pytest.mark.parametrize(("changes", "needle"), [
    ({"host_pages": 8, "prefix_cache": False},
     "--host-pages with --preempt recompute needs --prefix-cache"),
    ({"host_pages": 8, "window": 32, "layers": 4},
     "--host-pages with --preempt recompute does not work with --window"),
    ({"host_pages": -1}, "--host-pages must be an integer"),
    ({"host_pages": True}, "--host-pages must be an integer"),
])
def test_bad_host_tier_configs_are_reported(changes, needle):
    with pytest.raises(ConfigurationError, match=needle):
        Simulator(SimConfig(**{**OFFLOAD, **changes}))


def test_no_prefix_cache_or_window_with_swap_still_takes_a_host_tier():
    for changes in ({"prefix_cache": False}, {"window": 32, "layers": 4}):
        sim = Simulator(SimConfig(**{**OFFLOAD, **changes}, preempt="swap", host_pages=64))
        assert sim.cache.host_tier is not None


def test_cli_recompute_with_host_pages(tmp_path):
    out = tmp_path / "offload.json"
    proc = run_cli("simulate", *OFFLOAD_FLAGS, "--host-pages", "256", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = {line[:38].strip(): line[39:] for line in proc.stdout.splitlines()}
    assert "prefix offload only (victims are recomputed)" in rows["host tier"]
    assert "offloads of evicted prefix pages" in rows["prefix offload to the host tier"]
    assert "loaded" in rows["host-tier prefix hits"]
    assert "from the prefix cache" in rows["admitted prompt tokens"]
    assert ", 0 mismatches, 0 invariant failures" in proc.stdout.splitlines()[-1]
    data = json.loads(out.read_text())
    assert data["ok"] and "swap" not in data
    assert data["prefix_offload"]["loads"] > 0
    assert data["prefix_offload"]["kvcore_loaded"] == data["prefix_offload"]["load_pages"]
    assert data["config"]["host_pages"] == 256


def test_cli_recompute_without_host_pages_prints_no_host_rows(tmp_path):
    out = tmp_path / "plain.json"
    proc = run_cli("simulate", *OFFLOAD_FLAGS, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "host tier" not in proc.stdout and "prefix offload" not in proc.stdout
    assert "admitted prompt tokens" not in proc.stdout
    data = json.loads(out.read_text())
    assert "prefix_offload" not in data and "swap" not in data
    assert data["admitted_hit_tokens"] > 0 and data["prefill_tokens"] > 0


@pytest.mark.parametrize("host_pages", [None, "128"])
def test_cli_both_gives_both_runs_the_same_host_tier(tmp_path, host_pages):
    out = tmp_path / "both.json"
    flags = ["--host-pages", host_pages] if host_pages else []
    proc = run_cli("simulate", *OFFLOAD_FLAGS, "--preempt", "both", *flags, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    pages = int(host_pages or 96)   # default: as many as --pages, for both runs
    assert f"--preempt recompute (host tier of {pages} pages)" in proc.stdout
    assert f"--preempt swap (host tier of {pages} pages)" in proc.stdout
    comparison = proc.stdout.split("swap against recompute (the same workload and host "
                                   "tier)")[1]
    assert f"both runs, {pages} pages each" in comparison
    assert "prompt tokens prefilled" in comparison
    data = json.loads(out.read_text())
    assert data["ok"] is True
    assert data["recompute"]["config"]["host_pages"] == pages
    assert data["swap"]["config"]["host_pages"] == pages
    assert data["recompute"]["prefix_offload"]["host_pages"] == pages
    assert data["swap"]["prefix_offload"]["host_pages"] == pages
    assert "swap" not in data["recompute"]


@pytest.mark.parametrize(("flags", "line"), [
    (["--host-pages", "0"], "neither run (--host-pages 0)"),
    (["--no-prefix-cache"], "swap run only (96 pages, for its victims)"),
])
def test_cli_both_says_when_the_runs_differ_in_host_tier(tmp_path, flags, line):
    proc = run_cli("simulate", *OFFLOAD_FLAGS, "--preempt", "both", *flags)
    assert proc.returncode == 0, proc.stderr
    comparison = proc.stdout.split("swap against recompute")[1]
    assert line in comparison


@pytest.mark.parametrize(("flags", "needle"), [
    (["--host-pages", "8", "--no-prefix-cache"],
     "--host-pages with --preempt recompute needs --prefix-cache"),
    (["--host-pages", "8", "--window", "32", "--layers", "4"],
     "--host-pages with --preempt recompute does not work with --window"),
])
def test_cli_rejects_host_pages_that_recompute_cannot_use(flags, needle):
    proc = run_cli("simulate", *OFFLOAD_FLAGS, *flags)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr

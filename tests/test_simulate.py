"""kvcore simulate / bench / info, and the simulator's integrity check."""

import json
import subprocess
import sys

import numpy as np
import pytest

from kvcore.simulate import (
    ConfigurationError,
    SimConfig,
    Simulator,
    hybrid_layers,
    token_words,
    window_page_bound,
)

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


# -- --window (hybrid model) and --speculative ---------------------------------------------

HYBRID = dict(requests=16, pages=512, max_running=16, device="cpu", layers=4, page_size=8,
              max_prompt_len=512, max_output_len=256, system_prompt_len=64, seed=5)


def test_hybrid_layers_interleave_like_gemma_and_gpt_oss():
    assert hybrid_layers(2, 0.5) == ((1,), (0,))
    assert hybrid_layers(4, 0.5) == ((1, 3), (0, 2))                 # GPT-OSS: alternating
    assert hybrid_layers(12, 5 / 6) == ((5, 11), (0, 1, 2, 3, 4, 6, 7, 8, 9, 10))   # Gemma 3
    full, window = hybrid_layers(7, 0.3)
    assert len(window) == 2 and sorted(full + window) == list(range(7))


def test_window_page_bound():
    assert window_page_bound(1024, 1, 16) == 65
    assert window_page_bound(1024, 5, 16) == 66
    assert window_page_bound(1, 1, 16) == 2


@pytest.mark.parametrize("spec", [0, 3])
def test_hybrid_run_verifies_clean_and_holds_the_window_bound(spec):
    cfg = SimConfig(**HYBRID, window=40, speculative=spec)
    result = Simulator(cfg).run()
    assert result.ok, result.hybrid["problems"]
    hybrid = result.hybrid
    assert hybrid["full_layers"] == [1, 3] and hybrid["window_layers"] == [0, 2]
    assert hybrid["window_bound_violations"] == 0 and hybrid["problems"] == []
    assert hybrid["max_window_pages_per_seq"] <= hybrid["window_page_bound"]
    assert (hybrid["max_window_pages_per_seq_decode"]
            <= hybrid["window_page_bound_decode"]
            == window_page_bound(40, 1 + spec, 8))
    assert hybrid["window_tokens_verified"] > 0 and hybrid["group_table_checks"] > 0
    # a window of 40 tokens holds far fewer pages than full attention does
    assert hybrid["window_pages_peak"] < hybrid["full_pages_peak"]
    assert 0 < hybrid["memory_saved_mean"] < 0.5   # two equal groups: at most half
    assert 0 < result.utilization["paged"] <= 1
    assert result.utilization["contiguous"] < result.utilization["paged"]
    assert (result.speculative is None) == (spec == 0)


def test_speculative_run_verifies_clean_and_finishes_the_same_workload():
    plain = Simulator(SimConfig(**HYBRID)).run()
    result = Simulator(SimConfig(**HYBRID, speculative=4)).run()
    assert result.ok and result.hybrid is None
    spec = result.speculative
    assert spec["k"] == 4 and spec["drafts_rejected"] > 0 and spec["drafts_accepted"] > 0
    assert spec["drafts_rejected"] + spec["drafts_accepted"] == spec["drafts"]
    assert 1 < spec["accepted_per_step"] < 1 + 4
    # the same requests finish with the same outputs, in fewer steps
    assert (result.requests_done, result.samples_done) == (plain.requests_done,
                                                          plain.samples_done)
    assert spec["tokens_accepted"] == spec["sequence_steps"] + spec["drafts_accepted"]
    # prefix lookups with rejected drafts in place never match past them
    assert spec["rejected_lookups"] > 0 and spec["rejected_hits"] == 0
    assert result.steps - result.idle_steps < plain.steps - plain.idle_steps
    # rejected drafts are written too, then rolled back
    assert result.tokens_written > plain.tokens_written


def test_a_plain_run_reports_nothing_new():
    result = Simulator(SimConfig(requests=8, pages=512, max_running=16, device="cpu")).run()
    assert result.hybrid is None and result.speculative is None and result.utilization is None
    assert not {"window", "window_layers", "speculative"} & set(result.config)
    assert set(result.timeline) == {"step", "pages_used", "running", "waiting", "hit_rate"}


def _find(sim, seq):
    return next((r, r.seq_ids.index(seq)) for r in sim.requests if seq in r.seq_ids)


def test_corruption_of_a_window_layer_is_caught():
    """One element of a live window page of a window layer: the read-back of that
    sequence (window layers are read from the pool directly) must see it."""
    seen = []

    def corrupt(sim, step):
        if step == 12:
            seq = int(sim.cache.table.active_seq_ids()[0])
            page = int(sim.cache.pages(seq, group=1)[-1])   # holds the newest tokens
            offset = (sim.cache.num_tokens(seq) - 1) % sim.cfg.page_size
            sim.cache.k_cache(2)[page, offset] = sim.cache.k_cache(2)[page, offset] + 1
            before = sim.result.mismatches
            sim._verify(*_find(sim, seq), spot=True)
            seen.append(sim.result.mismatches - before)

    result = Simulator(SimConfig(**HYBRID, window=40), on_step=corrupt).run()
    assert seen == [1] and result.mismatches >= 1 and not result.ok


def test_a_rejected_draft_that_is_not_rolled_back_is_caught():
    """A truncate that keeps a rejected draft once: that sequence's tokens are no longer
    the accepted ones, which its read-back counts."""
    class KeepsOneDraft(Simulator):
        def _init_extras(self, kv_config):
            super()._init_extras(kv_config)
            truncate, kept = self.cache.truncate, []

            def sloppy(seq_ids, num_tokens):
                num_tokens = np.array(num_tokens)
                lengths = np.array([self.cache.num_tokens(s) for s in seq_ids])
                rejected = np.flatnonzero(num_tokens < lengths)
                if not kept and rejected.size:
                    kept.append(seq_ids[rejected[0]])
                    num_tokens[rejected[0]] += 1
                truncate(seq_ids, num_tokens)
            self.cache.truncate = sloppy

    result = KeepsOneDraft(SimConfig(**HYBRID, window=40, speculative=3)).run()
    assert result.mismatches > 0 and not result.ok


@pytest.mark.parametrize(("changes", "needle"), [
    ({"window": 0}, "--window must be a positive integer"),
    ({"speculative": -1}, "--speculative must be an integer >= 0"),
    ({"window": 64, "window_layers": 1.0}, "--window-layers must be a number between 0 and 1"),
    ({"window_layers": 0.25}, "--window-layers needs --window"),
    ({"window": 64, "layers": 1}, "needs at least one of each"),
    ({"window": 64, "window_layers": 0.1}, "makes 0 sliding-window and 4 full-attention"),
])
def test_bad_window_and_speculative_configs_are_reported(changes, needle):
    with pytest.raises(ConfigurationError, match=needle):
        Simulator(SimConfig(**{**HYBRID, **changes}))

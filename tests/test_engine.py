"""A real transformer on kvcore: the example engine's logits equal transformers' own.

Needs the ``model`` extra (torch, transformers). Without it these tests skip, except
under ``CI=true``, where a missing extra is a failure: CI must run the check.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

if os.environ.get("CI") != "true":   # CI installs the model extra: there a gap fails
    pytest.importorskip("torch")
    pytest.importorskip("transformers")

import torch
import transformers  # noqa: F401

from kvcore import KVCache, KVCacheConfig
from kvcore.examples.check import check_against_transformers, compare
from kvcore.examples.engine import (
    Engine,
    Request,
    main,
    make_engine,
    make_workload,
)
from kvcore.examples.model import TINY, TINY_HYBRID, kvcore_attention

# The tiny model gains nothing from intra-op threads, and OpenMP threads spinning on a
# busy 2-core machine can slow it down a hundredfold.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def served():
    """The default workload served on the CPU (float32 pages, torch reference attention)."""
    engine = make_engine()
    requests = make_workload()
    finished = engine.run(requests)
    return engine, requests, finished


def test_logits_equal_transformers_position_by_position(served):
    engine, _, finished = served
    report = check_against_transformers(engine.model, finished)
    assert report.passed, report.summary()
    assert report.max_rel_error <= 1e-4
    # The check means something only if the logits are far from ties.
    assert sum(s.argmax_checked for s in report.samples) >= 0.95 * report.positions


def test_the_workload_exercised_every_kvcore_path(served):
    engine, requests, finished = served
    stats = engine.stats
    assert stats.prefix_hit_tokens > 0          # the system prompt came from the cache
    assert stats.forks == sum(r.num_samples == 2 for r in requests) > 0
    assert stats.cow_copies > 0                 # forked samples wrote into a shared page
    assert stats.admission_waits > 0            # the pool was small enough to make requests wait
    assert stats.mixed_steps > 0                # prefill chunks and decode tokens in one step
    assert stats.peak_pages_used <= engine.cache.config.num_pages
    assert len({r.arrival_step for r in requests}) > 5
    assert len({f.finish_step for f in finished}) > 5
    assert any(f.first_position > 0 for f in finished)
    assert any(len(r.prompt) > engine.max_tokens for r in requests)   # chunked prefill


def test_every_sample_finishes_with_its_length_and_the_cache_empties(served):
    engine, requests, finished = served
    by_request = {r.request_id: r for r in requests}
    assert len(finished) == sum(r.num_samples for r in requests)
    for sample in finished:
        request = by_request[sample.request_id]
        assert sample.tokens[:len(request.prompt)] == list(request.prompt)
        assert len(sample.tokens) == len(request.prompt) + request.max_new_tokens
    assert engine.cache.num_seqs == 0
    engine.cache.check_invariants()
    # Only cached prompt pages (refcount 0, evictable) remain; nothing leaked.
    assert engine.cache.num_free_pages == engine.cache.config.num_pages


def test_forks_take_the_runner_up_and_continue_on_their_own_pages(served):
    _, requests, finished = served
    for request in requests:
        if request.num_samples != 2:
            continue
        first, second = sorted((f for f in finished if f.request_id == request.request_id),
                               key=lambda f: f.sample_index)
        at = len(request.prompt)
        assert first.tokens[:at] == second.tokens[:at]
        assert first.tokens[at] != second.tokens[at]
        # The fork's first token is the runner-up of the prompt's last logits row.
        last_row = first.logits[at - 1 - first.first_position]
        assert second.tokens[at] == int(last_row.topk(2).indices[1])


def test_hnd_pages_give_the_same_tokens_and_logits(served):
    _, requests, finished = served
    engine = make_engine(layout="HND")
    again = engine.run(requests)
    assert check_against_transformers(engine.model, again).passed
    key = lambda f: (f.request_id, f.sample_index)   # noqa: E731
    assert {key(f): f.tokens for f in again} == {key(f): f.tokens for f in finished}


def test_without_kept_logits_the_engine_generates_the_same_tokens(served):
    _, requests, finished = served
    engine = make_engine(keep_logits=False)
    again = engine.run(requests)
    key = lambda f: (f.request_id, f.sample_index)   # noqa: E731
    assert {key(f): f.tokens for f in again} == {key(f): f.tokens for f in finished}
    assert all(len(f.logits) == 0 for f in again)


# -- sliding windows and speculative decoding under a real model ------------------------------

@pytest.mark.parametrize("speculative", [0, 3])
def test_hybrid_window_model_equals_transformers(speculative):
    """Qwen2 layers alternating full attention and a 24-token window: the window group
    releases pages as sequences outgrow it, and the logits still equal transformers'."""
    engine = make_engine(TINY_HYBRID, num_pages=96, speculative=speculative)
    finished = engine.run(make_workload(TINY_HYBRID))
    report = check_against_transformers(engine.model, finished)
    assert report.passed, report.summary()
    assert engine.stats.max_window_start > 0          # window pages were released
    assert engine.stats.prefix_hit_tokens > 0         # hits served both groups
    assert engine.cache.num_seqs == 0
    engine.cache.check_invariants()


def test_speculative_decoding_rolls_back_rejected_drafts(served):
    _, requests, _ = served
    engine = make_engine(speculative=3)
    finished = engine.run(requests)
    report = check_against_transformers(engine.model, finished)
    assert report.passed, report.summary()
    assert engine.stats.drafts_accepted > 0 and engine.stats.drafts_rejected > 0
    engine.cache.check_invariants()
    assert engine.cache.num_free_pages == engine.cache.config.num_pages


@pytest.mark.parametrize("shape, speculative", [(TINY, 0), (TINY_HYBRID, 3)])
def test_preemption_by_swap_keeps_every_logit(shape, speculative):
    """Every few steps the newest request goes out to the host tier and comes back: the
    model's logits after its swap-in must equal transformers' as before."""
    engine = make_engine(shape, num_pages=96, speculative=speculative, preempt_every=3)
    finished = engine.run(make_workload(shape, num_requests=12))
    assert engine.stats.swap_outs == engine.stats.swap_ins >= 5
    assert engine.stats.pages_swapped > 0
    report = check_against_transformers(engine.model, finished)
    assert report.passed, report.summary()
    engine.cache.check_invariants()
    assert engine.cache.num_free_pages == engine.cache.config.num_pages
    assert engine.cache.num_free_host_pages == engine.cache.config.num_host_pages


def test_the_check_fails_when_a_swapped_page_comes_back_wrong():
    engine = make_engine(num_pages=96, preempt_every=3)
    swap_copy = engine.cache.backend.swap_copy

    def corrupting(direction, device_pages, host_pages, stream=None):
        event = swap_copy(direction, device_pages, host_pages, stream)
        if direction == "in":
            engine.cache.kv[:, :, device_pages[:1]] *= 1.5
        return event
    engine.cache.backend.swap_copy = corrupting
    finished = engine.run(make_workload(num_requests=12))
    assert not check_against_transformers(engine.model, finished).passed


def test_the_check_fails_when_rejected_drafts_stay():
    engine = make_engine(speculative=3, num_pages=96)
    engine.cache.truncate = lambda seq_ids, num_tokens: None     # rollback skipped
    try:
        finished = engine.run(make_workload(num_requests=8))
    except Exception:       # the cache and the engine disagree on lengths: also a failure
        return
    assert not check_against_transformers(engine.model, finished).passed


# -- the check is not vacuous: break one kvcore duty at a time, the check must fail ---------

def _broken_run(breakage):
    engine = make_engine()
    breakage(engine)
    finished = engine.run(make_workload(num_requests=12))
    return check_against_transformers(engine.model, finished)


def test_the_check_fails_without_copy_on_write():
    def skip_copies(engine):
        engine.cache.backend.copy_pages = lambda *args, **kwargs: None
    assert not _broken_run(skip_copies).passed


def test_the_check_fails_when_attention_misses_the_newest_key():
    def short_by_one(engine):
        plan = engine.attention.plan

        def shortened(batch):
            batch.seq_lens = batch.seq_lens.copy()
            batch.seq_lens[0] -= batch.seq_lens[0] > batch.num_new[0]
            plan(batch)
        engine.attention.plan = shortened
    assert not _broken_run(short_by_one).passed


def test_the_check_fails_when_a_write_lands_in_the_wrong_slot():
    def shifted_slots(engine):
        write = engine.cache.write

        def misplaced(layer, k, v, metadata):
            slots = metadata.slot_mapping[:metadata.num_tokens].copy()
            slots[-1] = (slots[-1] + 1) % (engine.cache.config.num_pages * 16)
            write(layer, k, v, slots)
        engine.cache.write = misplaced
    assert not _broken_run(shifted_slots).passed


def test_the_check_fails_when_prefix_pages_hold_other_tokens():
    def poisoned_prefix(engine):
        add_sequence = engine.cache.add_sequence

        def add(tokens):
            seq = add_sequence(tokens)
            pages = engine.cache.pages(seq)
            if len(pages) and engine.cache.num_tokens(seq):
                engine.cache.kv[:, :, pages[0]] *= 1.5     # cached K/V no longer the prompt's
            return seq
        engine.cache.add_sequence = add
    assert not _broken_run(poisoned_prefix).passed


def test_compare_measures_relative_error_and_clear_argmax():
    reference = torch.tensor([[4.0, 1.0, 0.0], [2.0, 1.999, 0.0]])
    engine = torch.tensor([[4.0, 1.0, 0.04], [1.999, 2.0, 0.0]])
    error, checked, mismatches, margin = compare(engine, reference, 1e-3)
    assert error == pytest.approx(0.01)
    assert checked == 1 and mismatches == 0          # row 2 is a near-tie: not checked
    assert margin == pytest.approx(0.0005, rel=1e-3)


# -- engine API and errors ---------------------------------------------------------------------

def test_a_request_larger_than_the_pool_stalls_with_a_clear_error():
    engine = make_engine(num_pages=4)
    too_big = Request(0, tuple(range(100)), max_new_tokens=1)
    with pytest.raises(RuntimeError, match="can never fit"):
        engine.run([too_big])


def test_engine_refuses_a_cache_of_another_shape():
    engine = make_engine()
    three_layers = KVCache(KVCacheConfig(num_layers=3, num_kv_heads=2, head_dim=128,
                                         page_size=16, num_pages=8, dtype="float32"),
                           device="cpu")
    with pytest.raises(ValueError, match="KV heads"):
        Engine(engine.model, three_layers, engine.attention)
    with pytest.raises(ValueError, match="attention must be"):
        make_engine(attention="sdpa")


def test_kvcore_attention_outside_the_engine_says_how_to_use_it():
    class Module:
        layer_idx = 0
    q = torch.zeros(1, 4, 2, 128)
    with pytest.raises(RuntimeError, match="kvcore_step"):
        kvcore_attention(Module(), q, q[:, :2], q[:, :2], None)


def test_workload_is_deterministic_and_varied():
    a, b = make_workload(seed=3), make_workload(seed=3)
    assert a == b
    assert a != make_workload(seed=4)
    assert {r.num_samples for r in a} == {1, 2}
    assert all(0 <= t < TINY.vocab_size for r in a for t in r.prompt)


def test_cli_serves_checks_and_writes_a_report(tmp_path, capsys):
    out = tmp_path / "engine.json"
    assert main(["--requests", "6", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["check"]["passed"] and report["tokens_generated"] > 0
    assert "check PASSED" in capsys.readouterr().out


# -- on the GPU: kvcore's CUDA kernels and FlashInfer under the same check ------------------------

needs_flashinfer = pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None,
                                      reason="needs FlashInfer (flashinfer-python)")


def _cuda_ready():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU visible to torch")


@pytest.mark.cuda
def test_cuda_float32_torch_attention_equals_transformers():
    _cuda_ready()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False     # float32 means float32 here
    try:
        engine = make_engine(TINY_HYBRID, device="cuda", attention="torch", dtype="float32",
                             num_pages=96, speculative=2, preempt_every=3)
        finished = engine.run(make_workload(TINY_HYBRID))
        report = check_against_transformers(engine.model, finished, dtype="float32")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert report.passed, report.summary()
    assert engine.stats.cow_copies > 0 and engine.stats.prefix_hit_tokens > 0
    assert engine.stats.swap_ins > 0            # preempted by swap through pinned memory


@pytest.mark.cuda
@needs_flashinfer
@pytest.mark.parametrize("layout,shape,speculative,preempt_every",
                         [("NHD", TINY, 0, 0), ("HND", TINY, 0, 0), ("NHD", TINY_HYBRID, 3, 0),
                          ("NHD", TINY, 2, 3)],
                         ids=["NHD", "HND", "hybrid-window-speculative", "swap-preemption"])
def test_cuda_bf16_flashinfer_matches_transformers_bf16(layout, shape, speculative,
                                                        preempt_every):
    _cuda_ready()
    engine = make_engine(shape, device="cuda", attention="flashinfer", dtype="bfloat16",
                         layout=layout, num_pages=96, speculative=speculative,
                         preempt_every=preempt_every)
    finished = engine.run(make_workload(shape))
    report = check_against_transformers(engine.model, finished, dtype="bfloat16")
    print(report.summary())
    assert report.passed, report.summary()
    assert np.mean([s.argmax_checked for s in report.samples]) > 0

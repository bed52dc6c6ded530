"""StepMetadata on the CPU: buffer contents and padding against a from-scratch model,
atomic validation, writes and gathers through it.

The CUDA path differs only in where the bytes live: several pinned staging buffers
and one device buffer, updated by a partial copy. ``staged`` caches reproduce exactly
that on the host (separate staging buffers, a copy of ``nbytes`` per update), so the
high-water padding logic that makes partial copies correct is tested here too.
"""

import numpy as np
import pytest

from kvcore import (
    CapacityError,
    InvalidPageError,
    KVCache,
    KVCacheConfig,
    ShapeError,
    UnknownSequenceError,
)

PAGE = 4


def metadata_cache(staged: bool, num_pages=64, max_seqs=8, layout="NHD"):
    cfg = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, page_size=PAGE,
                        num_pages=num_pages, dtype="float32", layout=layout,
                        max_seqs=max_seqs, max_pages_per_seq=16)
    cache = KVCache(cfg, device="cpu")
    if staged:
        backend = cache.backend

        def metadata_storage(nbytes, count):
            device = np.zeros(nbytes, np.uint8)
            backend._staged_device = device
            return device, [np.full(nbytes, 0xAB, np.uint8) for _ in range(count)]

        def upload_bytes(dst_ptr, staging, nbytes, stream):
            device = backend._staged_device
            assert dst_ptr == device.ctypes.data
            device[:nbytes] = staging[:nbytes]

        backend.metadata_storage = metadata_storage
        backend.upload_bytes = upload_bytes
    return cache


def expected(cache, meta, seq_ids, slots):
    """Every buffer at full capacity, built from scratch."""
    indptr, indices, last = cache.flashinfer_metadata(seq_ids)
    b, nnz = len(last), int(indptr[-1])
    lens = np.array([cache.num_tokens(s) for s in seq_ids], dtype=np.int64)
    want = {
        "page_indptr": np.concatenate([indptr, np.full(meta.max_batch - b, nnz)]),
        "last_page_len": np.concatenate([last, np.zeros(meta.max_batch - b)]),
        "seq_lens": np.concatenate([lens, np.zeros(meta.max_batch - b)]),
        "token_indptr": np.concatenate([[0], np.cumsum(lens),
                                        np.full(meta.max_batch - b, lens.sum())]),
        "slot_mapping": np.concatenate([slots, np.full(meta.max_tokens - len(slots), -1)]),
        "page_indices": np.concatenate([indices, np.full(meta.max_pages - nnz, -1)]),
    }
    if meta.block_tables is not None:
        bt = np.full((meta.max_batch, meta.max_pages_per_seq), -1)
        for row, seq in enumerate(seq_ids):
            pages = cache.pages(seq)
            bt[row, :len(pages)] = pages
        want["block_tables"] = bt
    return want


def assert_buffers(cache, meta, seq_ids, slots):
    for name, want in expected(cache, meta, seq_ids, slots).items():
        got = np.asarray(getattr(meta, name))
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert meta.batch_size == len(seq_ids) and meta.num_tokens == len(slots)


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("block_tables", [True, False])
def test_random_steps_match_a_from_scratch_model(staged, block_tables):
    cache = metadata_cache(staged)
    meta = cache.step_metadata(max_tokens=64, max_batch=6, max_pages=40,
                               block_tables=block_tables)
    assert_buffers(cache, meta, [], [])
    rng = np.random.default_rng(0)
    live = []
    for _ in range(300):
        if len(live) < 6 and rng.random() < 0.3:
            live.append(cache.add_sequence())
        if len(live) > 1 and rng.random() < 0.15:
            cache.remove(live.pop(int(rng.integers(len(live)))))
        batch = [s for s in live if rng.random() < 0.8]
        counts = rng.integers(0, 9, size=len(batch))
        if any(cache.num_tokens(s) + c > 16 * PAGE for s, c in zip(batch, counts, strict=True)) or \
                cache.pages_needed(batch, counts) > cache.num_free_pages:
            for s in live:
                cache.remove(s)
            live = []
            continue
        step = cache.append(batch, counts)
        slots = step.slot_mapping.copy()
        slots[rng.random(slots.size) < 0.1] = -1
        attend = [s for s in live if rng.random() < 0.9]
        if sum(len(cache.pages(s)) for s in attend) > meta.max_pages:
            continue
        meta.update(attend, slots)
        assert_buffers(cache, meta, attend, slots)


def test_worked_example_of_the_module_docstring():
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=16, num_pages=16,
                        dtype="float32")
    cache = KVCache(cfg, device="cpu")
    a, b = cache.add_sequence(), cache.add_sequence()
    step = cache.append([a, b], [45, 16])
    meta = cache.step_metadata(max_tokens=64, max_batch=4)
    meta.update([a, b], step)
    assert meta.page_indptr.tolist() == [0, 3, 4, 4, 4]
    assert meta.last_page_len.tolist() == [13, 16, 0, 0]
    assert meta.seq_lens.tolist() == [45, 16, 0, 0]
    assert meta.token_indptr.tolist() == [0, 45, 61, 61, 61]
    assert meta.num_live_tokens == 61 and meta.num_page_entries == 4


def snapshot(meta):
    names = ["page_indptr", "last_page_len", "seq_lens", "token_indptr", "slot_mapping",
             "page_indices", "block_tables"]
    return ({n: np.asarray(getattr(meta, n)).copy() for n in names},
            (meta.batch_size, meta.num_tokens, meta.num_page_entries, meta.num_live_tokens))


@pytest.mark.parametrize("staged", [False, True])
def test_a_rejected_update_changes_nothing(staged):
    cache = metadata_cache(staged)
    seqs = [cache.add_sequence() for _ in range(4)]
    step = cache.append(seqs, [9, 3, 17, 1])
    meta = cache.step_metadata(max_tokens=16, max_batch=3, max_pages=6, max_pages_per_seq=4)
    meta.update(seqs[:2], step.slot_mapping[:12])
    before = snapshot(meta)
    num_slots = cache.config.num_pages * PAGE
    bad_calls = [
        (CapacityError, "max_batch 3", lambda: meta.update(seqs, [])),
        (CapacityError, "max_pages 6", lambda: meta.update([seqs[2], seqs[0]], [])),
        (CapacityError, "max_tokens 16", lambda: meta.update(seqs[:1], step.slot_mapping)),
        (CapacityError, "max_pages_per_seq 4", lambda: meta.update(seqs[2:3], [])),
        (UnknownSequenceError, "7", lambda: meta.update([7], [])),
        (InvalidPageError, "out of range", lambda: meta.update(seqs[:1], [num_slots])),
        (TypeError, "integers", lambda: meta.update(seqs[:1], [0.5])),
        (ShapeError, "1-D", lambda: meta.update(seqs[:1], [[0]])),
    ]
    for error, message, call in bad_calls:
        with pytest.raises(error, match=message):
            call()
        after = snapshot(meta)
        for name, array in before[0].items():
            np.testing.assert_array_equal(after[0][name], array, err_msg=name)
        assert after[1] == before[1]


def test_capacities_are_validated():
    cache = metadata_cache(False)
    for kwargs in (dict(max_tokens=0), dict(max_tokens=4, max_batch=-1),
                   dict(max_tokens=True), dict(max_tokens=4, max_pages=1.5)):
        with pytest.raises(ValueError, match="positive integer"):
            cache.step_metadata(**kwargs)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_write_and_gather_through_metadata_equal_the_direct_calls(layout):
    direct, via = metadata_cache(False, layout=layout), metadata_cache(True, layout=layout)
    rng = np.random.default_rng(1)
    seqs = [direct.add_sequence() for _ in range(3)]
    assert [via.add_sequence() for _ in range(3)] == seqs
    meta = via.step_metadata(max_tokens=40, max_batch=4)
    for counts in ([5, 9, 1], [1, 1, 1], [0, 7, 2]):
        step = direct.append(seqs, counts)
        via.append(seqs, counts)
        meta.update(seqs, step)
        n = step.slot_mapping.size
        for layer in range(2):
            k = rng.standard_normal((n, 2, 4)).astype(np.float32)
            v = rng.standard_normal((n, 2, 4)).astype(np.float32)
            direct.write(layer, k, v, step.slot_mapping)
            # a padded batch: rows past the step's tokens must write nothing
            pad = rng.standard_normal((40 - n, 2, 4)).astype(np.float32)
            via.write(layer, np.concatenate([k, pad]), np.concatenate([v, pad]), meta)
        np.testing.assert_array_equal(direct.kv, via.kv)
        for layer in range(2):
            k_ref, v_ref, indptr_ref = direct.gather(layer, seqs)
            out = (np.zeros((64, 2, 4), np.float32), np.zeros((64, 2, 4), np.float32))
            k, v, indptr = via.gather(layer, meta, out=out)
            total = int(indptr_ref[-1])
            assert k is out[0] and v is out[1]
            np.testing.assert_array_equal(k[:total], k_ref)
            np.testing.assert_array_equal(v[:total], v_ref)
            np.testing.assert_array_equal(indptr[:4], indptr_ref)


def test_metadata_of_another_cache_or_too_many_rows_is_refused():
    one, other = metadata_cache(False), metadata_cache(False)
    meta = other.step_metadata(max_tokens=8)
    k = np.zeros((8, 2, 4), np.float32)
    with pytest.raises(ValueError, match="another KVCache"):
        one.write(0, k, k, meta)
    with pytest.raises(ValueError, match="another KVCache"):
        one.gather(0, meta)
    mine = one.step_metadata(max_tokens=4)
    with pytest.raises(ShapeError, match="max_tokens 4"):
        one.write(0, k, k, mine)
    class FakeDevice:
        def __init__(self):
            self.__cuda_array_interface__ = {}

    with pytest.raises(ShapeError, match="device array"):
        mine.update([], FakeDevice())


def test_gather_into_outputs_checks_them():
    cache = metadata_cache(False)
    seq = cache.add_sequence()
    cache.append([seq], [6])
    small = (np.zeros((5, 2, 4), np.float32), np.zeros((5, 2, 4), np.float32))
    with pytest.raises(ShapeError, match="5 rows, the batch holds 6"):
        cache.gather(0, [seq], out=small)
    wrong = (np.zeros((6, 2, 4), np.float16), np.zeros((6, 2, 4), np.float16))
    with pytest.raises(ShapeError, match="dtype float16"):
        cache.gather(0, [seq], out=wrong)


def test_gather_from_metadata_without_outputs_sizes_them_by_the_live_step():
    cache = metadata_cache(True)
    seqs = [cache.add_sequence() for _ in range(2)]
    step = cache.append(seqs, [5, 3])
    k = np.arange(8 * 2 * 4, dtype=np.float32).reshape(8, 2, 4)
    cache.write(0, k, -k, step.slot_mapping)
    meta = cache.step_metadata(max_tokens=8, max_batch=4)
    meta.update(seqs, step)
    k_out, v_out, indptr = cache.gather(0, meta)
    assert k_out.shape == (8, 2, 4) and meta.num_live_tokens == 8
    np.testing.assert_array_equal(k_out, k)
    np.testing.assert_array_equal(v_out, -k)
    np.testing.assert_array_equal(indptr, [0, 5, 8, 8, 8])


def test_a_staging_buffer_is_not_rewritten_before_its_copy_ran():
    """Streams simulated on the host: a copy reads its staging bytes only when its
    stream runs. Updates alternate between a stalled stream and a running one; every
    copy must still send exactly the bytes its update prepared."""
    cache = metadata_cache(False)
    backend = cache.backend
    queues = {1: [], 2: []}
    done = {1: 0, 2: 0}
    sent = []

    def run(stream, upto=None):
        queue = queues[stream]
        upto = len(queue) if upto is None else upto
        while done[stream] < upto:
            op = queue[done[stream]]
            done[stream] += 1
            if op[0] == "copy":
                _, device, staging, nbytes, expected = op
                assert np.array_equal(staging[:nbytes], expected), "staging rewritten early"
                device[:nbytes] = staging[:nbytes]
                sent.append(nbytes)

    def metadata_storage(nbytes, count):
        backend._sim_device = np.zeros(nbytes, np.uint8)
        return backend._sim_device, [np.zeros(nbytes, np.uint8) for _ in range(count)]

    backend.metadata_storage = metadata_storage
    backend.resolve_stream = lambda stream: 1 if stream is None else stream
    backend.current_stream = lambda: 1
    backend.upload_bytes = lambda ptr, staging, nbytes, stream: queues[stream].append(
        ("copy", backend._sim_device, staging, nbytes, staging[:nbytes].copy()))
    backend.record_event = lambda stream, event=None: (stream, len(queues[stream]))
    backend.wait_event = lambda event: event is not None and run(*event)
    seqs = [cache.add_sequence() for _ in range(4)]
    step = cache.append(seqs, [3, 5, 7, 9])
    meta = cache.step_metadata(max_tokens=32, max_batch=4)
    run(1)
    rng = np.random.default_rng(0)
    for i in range(40):
        stream = 1 if i % 5 == 0 else 2          # stream 1 stalls; stream 2 runs
        batch = list(rng.permutation(seqs)[:rng.integers(0, 5)])
        meta.update(batch, step.slot_mapping[:rng.integers(0, 24)], stream=stream)
        if stream == 2:
            run(2)
    run(1)
    run(2)
    assert len(sent) == 41

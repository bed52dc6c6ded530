"""Concurrency contract: every PageTable call is atomic with respect to other Python
threads. Several threads hammer one table (prefix caching on, shared prompts, so they
also share pages) with a switch interval of a microsecond; afterwards the invariants
hold and every thread's sequences have exactly the lengths and pages it expects."""

import os
import sys
import threading

import numpy as np

from kvcore import CapacityError, OutOfPagesError, PageAllocator, PageTable

THREADS, OPS = 4, 3000


def run_threads(target, arguments):
    """One thread per argument tuple, all at a 1 µs switch interval so they interleave
    often; returns when every thread has finished."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=target, args=args) for args in arguments]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)


def worker(table, seed, results, errors):
    rng = np.random.default_rng(seed)
    mine = {}   # seq -> expected length
    try:
        for _ in range(OPS):
            op = rng.random()
            try:
                if op < 0.2 or not mine:
                    prompt = [1, 2, 3, 4, 5, 6, 7, 8, *rng.integers(0, 3, size=4).tolist()]
                    seq = table.add_sequence(prompt)
                    mine[seq] = table.num_tokens(seq)
                    rest = prompt[mine[seq]:]
                    table.append([seq], [len(rest)], token_ids=rest)
                    mine[seq] += len(rest)
                elif op < 0.3:
                    parent = list(mine)[rng.integers(len(mine))]
                    child = table.fork(parent)
                    mine[child] = mine[parent]
                elif op < 0.45:
                    seq = list(mine)[rng.integers(len(mine))]
                    table.remove(seq)
                    del mine[seq]
                else:
                    seqs = list(mine)
                    table.append(seqs, 1, token_ids=rng.integers(0, 3, size=len(seqs)))
                    for seq in seqs:
                        mine[seq] += 1
                    table.flashinfer_metadata(seqs)
            except (OutOfPagesError, CapacityError):
                pass
            for seq, length in mine.items():   # nobody else touched my sequences
                assert table.num_tokens(seq) == length
        results[seed] = mine
    except BaseException as exc:  # surfaced in the main thread
        errors.append(exc)


def test_one_table_many_threads():
    table = PageTable(PageAllocator(256), 4, 64, 32, enable_prefix_cache=True)
    results, errors = {}, []
    run_threads(worker, [(table, seed, results, errors) for seed in range(THREADS)])
    assert not errors, errors[0]
    table.check_invariants()
    live = {seq for mine in results.values() for seq in mine}
    assert live == set(table.active_seq_ids().tolist())
    for mine in results.values():
        for seq, length in mine.items():
            assert table.num_tokens(seq) == length


STRESS_OPS = int(os.environ.get("KVCORE_STRESS_OPS", "1500"))   # longer profile: raise it


def stress_worker(table, seed, owned, taken_pages, events, errors):
    rng = np.random.default_rng(seed)
    mine = set()
    try:
        for _ in range(STRESS_OPS):
            op = int(rng.integers(12))
            try:
                if op == 0 or not mine:
                    prompt = np.array([1, 2, 3, 4, 5, *rng.integers(0, 3, size=3)], dtype=">i4")
                    seq = table.add_sequence(prompt)
                    assert seq not in owned, f"seq {seq} handed out twice"
                    owned[seq] = seed
                    mine.add(seq)
                elif op == 1:
                    child = table.fork(next(iter(mine)))
                    assert child not in owned, f"seq {child} handed out twice"
                    owned[child] = seed
                    mine.add(child)
                elif op == 2:
                    seq = mine.pop()
                    del owned[seq]
                    table.remove(seq)
                elif op == 3:
                    seqs = np.array(sorted(mine), dtype=np.int64)
                    table.append(seqs, np.ones(len(seqs), dtype=np.int64),
                                 token_ids=rng.integers(0, 3, size=len(seqs)).astype(">i8"))
                elif op == 4:
                    indptr, indices, _ = table.flashinfer_metadata(list(mine))
                    assert indptr[-1] == indices.size
                elif op == 5:
                    table.block_tables(np.array(list(mine), dtype=np.int32))
                elif op == 6:
                    assert set(table.active_seq_ids().tolist()) >= mine
                elif op == 7:
                    kind, _, _ = table.take_events()
                    events.append(kind.size)
                elif op == 8:
                    table.pages_needed(list(mine), 2)
                    table.match_prefix([1, 2, 3, 4, 5])
                elif op == 9:
                    seq = next(iter(mine))
                    table.pages(seq)
                    if table.num_tokens(seq):
                        table.slot(seq, 0)
                elif op == 10:
                    pages = table.allocator.allocate(2)
                    for p in pages.tolist():
                        assert p not in taken_pages, f"page {p} handed out twice"
                        taken_pages.add(p)
                    for p in pages.tolist():
                        taken_pages.discard(p)
                    table.allocator.decref(pages.astype(">i4"))
                else:
                    table.prefix_stats   # noqa: B018
            except (OutOfPagesError, CapacityError):
                pass
    except BaseException as exc:  # surfaced in the main thread
        errors.append(exc)


def test_every_call_many_threads():
    """Every public table call from 8 threads at once: distinct seq and page ids,
    invariants hold, and no event is lost without being counted."""
    table = PageTable(PageAllocator(512), 4, 64, 32, enable_prefix_cache=True,
                      prefix_event_capacity=64)
    owned, taken_pages, events, errors = {}, set(), [], []
    run_threads(stress_worker, [(table, seed, owned, taken_pages, events, errors)
                                for seed in range(8)])
    assert not errors, errors[0]
    table.check_invariants()
    assert set(owned) == set(table.active_seq_ids().tolist())
    kind, _, _ = table.take_events()
    stats = table.prefix_stats
    assert sum(events) + kind.size + stats["events_dropped"] == (
        stats["stored"] + stats["evictions"])

"""Concurrency contract: every PageTable call is atomic with respect to other Python
threads. Several threads hammer one table (prefix caching on, shared prompts, so they
also share pages) with a switch interval of a microsecond; afterwards the invariants
hold and every thread's sequences have exactly the lengths and pages it expects."""

import sys
import threading

import numpy as np

from kvcore import CapacityError, OutOfPagesError, PageAllocator, PageTable

THREADS, OPS = 4, 3000


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
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(table, seed, results, errors))
                   for seed in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[0]
    table.check_invariants()
    live = {seq for mine in results.values() for seq in mine}
    assert live == set(table.active_seq_ids().tolist())
    for mine in results.values():
        for seq, length in mine.items():
            assert table.num_tokens(seq) == length

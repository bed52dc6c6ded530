"""kvcore serving a real transformer: a small continuous-batching engine.

``kvcore.examples`` shows kvcore end to end under a Hugging Face ``transformers``
Llama model (random weights, nothing downloaded): ragged steps of prefill chunks and
decode tokens, K and V written into a :class:`kvcore.KVCache` through each step's slot
mapping, attention read from the pages through kvcore's metadata, prefix hits, forks
with copy-on-write, admission that waits for pages. Its check compares every logit the
engine produced with transformers' own forward over the same tokens.

It needs the ``model`` extra (``pip install "kvcore[model]"``: torch and transformers);
``import kvcore`` never imports it. Run it with ``python -m kvcore.examples.engine``.

Modules
-------
model
    The Llama model (config, seeded random weights scaled up) and the registration of
    kvcore's attention with transformers' ``AttentionInterface``.
attention
    Paged attention over kvcore's pool: a torch reference over the block tables, and
    FlashInfer's batch prefill / decode on CUDA.
engine
    Requests, the scheduler (admission, chunked prefill, forks) and the step loop.
check
    The teacher-forced comparison with transformers.
"""

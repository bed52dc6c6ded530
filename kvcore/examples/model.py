"""A Llama model with random weights, and kvcore's attention registered with transformers.

The model is a plain ``transformers.LlamaForCausalLM`` (grouped-query attention, RoPE,
RMSNorm, SwiGLU) built from a config, seeded, never downloaded. Its weights are scaled
up from the default initialisation: at the default scale every logit is within a hair
of every other, so a wrong page would hide among near-ties; scaled up, the top logits
are well apart and a comparison means something.

kvcore plugs in as an attention implementation named ``"kvcore"``: transformers calls
it once per layer with the step's queries, keys and values after RoPE, and it hands
them to the engine's step (passed down as the ``kvcore_step`` keyword), which writes K
and V into the pages and attends over them. No transformers cache is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from transformers import (
    AttentionInterface,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface

#: The attention implementation name kvcore registers with transformers.
ATTENTION_NAME = "kvcore"


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama model (head_dim = hidden_size / num_heads).

    ``window``: every odd layer attends to a sliding window of that many tokens (the
    token and the ``window - 1`` before it), as GPT-OSS and Gemma interleave local and
    global layers; the model is then transformers' Qwen2 (Llama's architecture with
    per-layer sliding windows and q/k/v biases).
    """

    vocab_size: int = 1024
    hidden_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 1024
    max_positions: int = 2048
    window: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def window_layers(self) -> tuple[int, ...]:
        """The sliding-window layers (the odd ones), empty without a window."""
        return tuple(range(1, self.num_layers, 2)) if self.window else ()


#: The check's model: tiny (CPU forward in milliseconds), GQA with two query heads per
#: KV head, and head_dim 128 so FlashInfer's common kernels serve it on the GPU.
TINY = ModelShape()

#: The hybrid check's model: four layers, the odd ones with a 24-token sliding window
#: (short, so the workload's sequences outgrow it and pages are released).
TINY_HYBRID = ModelShape(num_layers=4, window=24)

#: A 1B-class shape (Llama-3.2-1B's widths, 8 of its 16 layers) for throughput runs.
MEDIUM = ModelShape(vocab_size=32768, hidden_size=2048, num_layers=8, num_heads=16,
                    num_kv_heads=8, intermediate_size=8192, max_positions=4096)


def llama_config(shape: ModelShape = TINY) -> LlamaConfig | Qwen2Config:
    """The transformers config of ``shape`` (no tied embeddings, no bias, rope 10000);
    Qwen2's, alternating full and sliding-window layers, when ``shape.window`` is set."""
    if shape.window:
        return Qwen2Config(
            vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
            num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
            max_position_embeddings=shape.max_positions, tie_word_embeddings=False,
            use_sliding_window=True, sliding_window=shape.window,
            layer_types=["sliding_attention" if layer in shape.window_layers
                         else "full_attention" for layer in range(shape.num_layers)])
    return LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )


def build_model(shape: ModelShape = TINY, *, seed: int = 0, weight_scale: float = 4.0,
                dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` with windows) with seeded random
    weights, in eval mode.

    Parameters
    ----------
    shape : ModelShape
        Sizes; default :data:`TINY`.
    seed : int
        Seeds torch's generator before initialisation: the same seed gives the same
        weights on every machine and device (weights are made on the CPU, then moved).
    weight_scale : float
        Every matrix (embedding, projections, head) is multiplied by this after the
        default init (normal, std 0.02), so that logits are spread out, not near-ties.
    dtype : torch.dtype
        ``torch.float32`` (the CPU check) or ``torch.bfloat16`` (FlashInfer).
    device : str
        Where the model lives.

    Returns
    -------
    LlamaForCausalLM
        Using transformers' ``sdpa`` attention until an engine switches it to
        :data:`ATTENTION_NAME` (see :func:`use_attention`).
    """
    torch.manual_seed(seed)
    config = llama_config(shape)
    config._attn_implementation = "sdpa"
    model = (Qwen2ForCausalLM if shape.window else LlamaForCausalLM)(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(weight_scale)
    return model.to(device=device, dtype=dtype).eval()


def kvcore_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):
    """transformers' attention hook: hand one layer's Q, K, V to the engine's step.

    Parameters
    ----------
    module : LlamaAttention
        Its ``layer_idx`` names the kvcore layer.
    query : torch.Tensor, shape [1, num_heads, T, head_dim]
        The step's T packed tokens (every request's new tokens, one after another).
    key, value : torch.Tensor, shape [1, num_kv_heads, T, head_dim]
        The new tokens' keys (after RoPE) and values.
    attention_mask : None
        kvcore's mask function returns None: the step knows each request's extent.
    kwargs
        ``kvcore_step``: the engine's step, with ``attend(layer, q, k, v) -> out``
        taking ``[T, H, D]`` views and returning ``[T, num_heads, head_dim]``, and
        ``check_window(layer, sliding_window)`` (the model's window of the layer must
        be its kvcore group's). ``sliding_window`` (Qwen2's window layers).

    Returns
    -------
    (torch.Tensor, None)
        ``[1, T, num_heads, head_dim]`` and no attention weights.
    """
    step = kwargs.get("kvcore_step")
    if step is None:
        raise RuntimeError(f"attention {ATTENTION_NAME!r} called without a kvcore_step: "
                           "run the model through kvcore.examples.engine.Engine")
    if dropout:
        raise ValueError("kvcore attention is inference-only (dropout must be 0)")
    step.check_window(module.layer_idx, kwargs.get("sliding_window"))
    out = step.attend(module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1),
                      value[0].transpose(0, 1), scaling)
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs):
    """The mask hook for kvcore attention: no dense mask (the step masks per request)."""
    return None


def register_attention() -> None:
    """Register :func:`kvcore_attention` (and its mask hook) as ``"kvcore"``; idempotent."""
    AttentionInterface.register(ATTENTION_NAME, kvcore_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


class use_attention:
    """Context manager: run ``model`` with attention implementation ``name`` inside.

    The engine runs the model with ``"kvcore"``; the check runs the same model object
    with ``"sdpa"`` (transformers' own attention) over whole sequences.
    """

    def __init__(self, model: LlamaForCausalLM, name: str):
        self.model, self.name, self.saved = model, name, None

    def __enter__(self):
        if self.name == ATTENTION_NAME:
            register_attention()
        self.saved = self.model.config._attn_implementation
        self.model.config._attn_implementation = self.name
        return self.model

    def __exit__(self, *exc):
        self.model.config._attn_implementation = self.saved
        return False


def versions() -> dict:
    """The torch and transformers versions (for reports)."""
    return {"torch": torch.__version__, "transformers": transformers.__version__}

"""The teacher-forced check: the engine's logits against transformers' own forward.

For every finished sample, transformers runs the same model (its own ``sdpa``
attention, no kvcore) over the sample's final token sequence in one forward; the
logits the engine produced step by step must equal those, position by position.
Positions served from the prefix cache have no engine logits; the first computed
position after them attends over the cached pages, which is what checks them.

Per position ``p`` the error is ``max |engine - reference| / max |reference|`` over the
vocabulary; the check passes when the largest error is at most the tolerance, and at
every position where the reference's top two logits are more than the tolerance apart
(relative to the same scale) the engine's argmax equals the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvcore.examples.model import use_attention

#: Tolerances the issue sets: float32 on the CPU, bf16 with FlashInfer against
#: transformers' bf16 run.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-2}


@dataclass
class SampleCheck:
    """One sample's comparison."""

    request_id: int
    sample_index: int
    positions: int              # positions compared
    max_rel_error: float
    argmax_checked: int         # positions whose top-two margin exceeds the tolerance
    argmax_mismatches: int
    min_rel_margin: float       # smallest top-two margin / scale among compared positions


@dataclass
class CheckReport:
    """All samples' comparisons against one tolerance."""

    tolerance: float
    samples: list[SampleCheck] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float:
        return max((s.max_rel_error for s in self.samples), default=0.0)

    @property
    def positions(self) -> int:
        return sum(s.positions for s in self.samples)

    @property
    def argmax_mismatches(self) -> int:
        return sum(s.argmax_mismatches for s in self.samples)

    @property
    def passed(self) -> bool:
        return (bool(self.samples) and self.max_rel_error <= self.tolerance
                and self.argmax_mismatches == 0)

    def summary(self) -> str:
        forks = sum(s.sample_index == 1 for s in self.samples)
        return (f"check {'PASSED' if self.passed else 'FAILED'}: {len(self.samples)} samples "
                f"({forks} forked), {self.positions:,} positions, max relative error "
                f"{self.max_rel_error:.2e} (tolerance {self.tolerance:.0e}), argmax compared at "
                f"{sum(s.argmax_checked for s in self.samples):,} clear positions: "
                f"{self.argmax_mismatches} differ")

    def as_dict(self) -> dict:
        return {"passed": self.passed, "tolerance": self.tolerance,
                "max_rel_error": self.max_rel_error, "positions": self.positions,
                "argmax_mismatches": self.argmax_mismatches, "summary": self.summary(),
                "samples": [s.__dict__ for s in self.samples]}


def reference_logits(model, tokens) -> torch.Tensor:
    """transformers' logits over ``tokens`` (one sequence, its own attention), float32
    ``[len(tokens), vocab]`` on the model's device."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([tokens], dtype=torch.long, device=device)
    with use_attention(model, "sdpa"), torch.inference_mode():
        return model(input_ids=input_ids, use_cache=False).logits[0].float()


def compare(engine: torch.Tensor, reference: torch.Tensor, tolerance: float):
    """(max relative error, argmax checked, argmax mismatches, min relative margin) of
    two ``[N, vocab]`` logit arrays (float32, one device)."""
    scale = reference.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    errors = (engine - reference).abs().amax(dim=-1) / scale
    top2 = reference.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]) / scale
    clear = margin > tolerance
    mismatches = (engine.argmax(dim=-1) != reference.argmax(dim=-1)) & clear
    return (float(errors.max()), int(clear.sum()), int(mismatches.sum()),
            float(margin.min()))


def check_against_transformers(model, finished, *, dtype: str = "float32",
                               tolerance: float | None = None) -> CheckReport:
    """Compare every finished sample's engine logits with transformers' forward.

    Parameters
    ----------
    model : LlamaForCausalLM
        The engine's model (same weights, same dtype and device).
    finished : list of FinishedSample
        From :meth:`Engine.run` with ``keep_logits=True``.
    dtype : str
        Picks the default tolerance (:data:`TOLERANCE`).
    tolerance : float, optional
        Overrides it.

    Returns
    -------
    CheckReport
    """
    report = CheckReport(TOLERANCE[dtype] if tolerance is None else tolerance)
    for sample in finished:
        if len(sample.logits) != len(sample.tokens) - 1 - sample.first_position:
            raise ValueError(f"request {sample.request_id} sample {sample.sample_index}: "
                             "the engine kept no logits for every computed position")
        if len(sample.logits) == 0:
            continue
        reference = reference_logits(model, sample.tokens)[sample.first_position:-1]
        engine = sample.logits.to(reference.device)
        error, checked, mismatches, margin = compare(engine, reference, report.tolerance)
        report.samples.append(SampleCheck(sample.request_id, sample.sample_index,
                                          len(reference), error, checked, mismatches, margin))
    return report

"""Where a step falls in the recipe's phases, and its learning rate (all counted in samples).

A phase runs ceil(samples / global batch) steps. A phase the recipe gives in FLIP's virtual epochs
arrives here already as samples of whole steps (Recipe.validate: epochs x (epoch_samples // global
batch) steps, FLIP's count), so the ceiling changes nothing for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flip_ds.config import OptimConfig, PhaseConfig


@dataclass(frozen=True)
class PhaseSpan:
    index: int
    phase: PhaseConfig
    first_step: int
    steps: int
    peak_lr: float


class PhasePlan:
    """The phases laid out in optimizer steps of `global_batch` samples each."""

    def __init__(self, phases: list[PhaseConfig], optim: OptimConfig, global_batch: int) -> None:
        self.global_batch = global_batch
        self.spans: list[PhaseSpan] = []
        first = 0
        for i, phase in enumerate(phases):
            if phase.samples is None:
                raise ValueError(f"phase '{phase.name}' is still in epochs: load recipes through load_recipe, "
                                 "whose validation turns epochs into samples")
            steps = math.ceil(phase.samples / global_batch)
            base = phase.base_lr if phase.base_lr is not None else optim.base_lr
            self.spans.append(PhaseSpan(i, phase, first, steps, base * global_batch / 256))  # FLIP's lr scaling
            first += steps
        self.total_steps = first

    def span_at(self, step: int) -> PhaseSpan:
        for span in self.spans:
            if step < span.first_step + span.steps:
                return span
        return self.spans[-1]

    def lr_at(self, step: int) -> float:
        """Linear warmup to the phase's peak, then cosine to zero at the phase's end."""
        span = self.span_at(step)
        done = (step - span.first_step) * self.global_batch  # samples of this phase already seen
        total = span.steps * self.global_batch
        warmup = span.phase.warmup_samples
        if done < warmup:
            return span.peak_lr * (done + self.global_batch) / (warmup + self.global_batch)
        progress = (done - warmup) / max(1, total - warmup)
        return span.peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

"""One optimizer step of contrastive training, with feature-cache gradient accumulation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flip_ds.distributed import all_reduce
from flip_ds.engine import refresh_fp32_logit_scale, want_grad_norm
from flip_ds.loss import contrastive_loss
from flip_ds.metrics import Stopwatch


@dataclass
class StepOutcome:
    """What a step did. The loss and the temperature stay on the device until read, so that only
    a step that logs them waits for the device (a host read is a sync on a GPU)."""

    loss_tensor: torch.Tensor  # this rank's loss, detached
    scale_tensor: torch.Tensor  # 1/tau, detached
    stepped: bool  # False when any flag below is set: no rank updated
    nonfinite: bool = False  # some rank's loss was not finite: every rank skips the update
    # the loss was finite, a gradient was not: DeepSpeed skipped the update, on every rank (it
    # checks the reduced gradients)
    nonfinite_grad: bool = False
    stop: bool = False  # some rank was signalled: every rank saves and stops
    abort: bool = False  # some rank cannot go on (its data failed): every rank stops without saving

    @property
    def loss(self) -> float:
        return self.loss_tensor.item()

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale_tensor.item()


def mask_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The masking noise of (rank, step, micro batch): reproducible after a resume, distinct everywhere."""
    return int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1)[0])


def agree(loss: torch.Tensor, stop_requested: bool, abort_requested: bool) -> list[bool]:
    """[non-finite loss, stop, abort], each raised on any rank, raised on all: one small all-reduce,
    and the step's only host read. The finiteness test stays on the device until then, so it costs
    no sync of its own."""
    local = torch.stack([~torch.isfinite(loss.detach()), torch.full((), stop_requested, device=loss.device),
                         torch.full((), abort_requested, device=loss.device)]).float()
    return [v > 0 for v in all_reduce(local, "max").tolist()]


def contrastive_step(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], *, image_mask: float,
                     text_mask: float, seed: int, rank: int, step: int, device: str, stop_requested: bool,
                     watch: Stopwatch, abort_requested: bool = False, grad_norm: bool = True) -> StepOutcome:
    """Forward, backward and update over `micro_batches` (this rank's share of the global batch).
    `grad_norm`: whether the step needs DeepSpeed's gradient norm (it logs it); where the engine can
    skip the norm without giving up the clip or the skip of non-finite gradients, it then does
    (flip_ds.engine.want_grad_norm).

    With one micro batch it is a plain step. With k > 1 it is OpenCLIP's feature cache: a no-grad
    forward of every micro batch, then each micro batch re-forwarded with grad and scored with
    its live embeddings in place of its cached ones, so every row still sees all k x world
    negatives (naive accumulation would shrink the pool k-fold). Each re-forward's loss equals the
    full-batch loss and its gradient is the full gradient's share through that micro batch; the
    sum over micro batches is the full gradient. The temperature enters every re-forward, so its
    gradient is scaled by 1/k to be counted once.
    """
    k = len(micro_batches)
    want_grad_norm(engine, grad_norm)

    def agreed_skip(loss: torch.Tensor, scale: torch.Tensor, flags: list[bool]) -> StepOutcome:
        nonfinite, stop, abort = flags
        return StepOutcome(loss.detach(), scale.detach(), False, nonfinite=nonfinite, stop=stop, abort=abort)

    skipped_before = engine.skipped_steps  # DeepSpeed counts the updates its gradient check skips

    def after_update(loss: torch.Tensor, scale: torch.Tensor) -> StepOutcome:
        # its check has already read its verdict to the host: no sync here
        if engine.skipped_steps == skipped_before:
            return StepOutcome(loss.detach(), scale.detach(), True)
        return StepOutcome(loss.detach(), scale.detach(), False, nonfinite_grad=True)

    def forward(j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, tokens = micro_batches[j]
        generator = torch.Generator(device=device).manual_seed(mask_seed(seed, rank, step, j))
        return engine(images, tokens, image_mask, text_mask, generator)

    if k == 1:
        image_emb, text_emb, scale = forward(0)
        loss = contrastive_loss(image_emb, text_emb, scale)
        # one small all-reduce per step: the ranks skip, stop or abort together, and no collective is
        # left waiting for a rank that went away
        flags = agree(loss, stop_requested, abort_requested)
        if any(flags):
            return agreed_skip(loss, scale, flags)
        engine.backward(loss)
        watch.lap("forward_backward")
        engine.step()
        refresh_fp32_logit_scale(engine)
        watch.lap("optimizer")
        return after_update(loss, scale)

    with torch.no_grad():
        cached = [forward(j) for j in range(k)]
        cached_images = [c[0] for c in cached]
        cached_texts = [c[1] for c in cached]
        loss = contrastive_loss(torch.cat(cached_images), torch.cat(cached_texts), cached[0][2])
    flags = agree(loss, stop_requested, abort_requested)
    if any(flags):
        return agreed_skip(loss, cached[0][2], flags)
    for j in range(k):
        # the update after the last micro batch, whatever DeepSpeed's micro-step count: it counts
        # from the run's start, so after an odd number of steps at another accumulation its own
        # boundary would fall mid-step
        engine.set_gradient_accumulation_boundary(j == k - 1)
        image_emb, text_emb, scale = forward(j)
        images = torch.cat(cached_images[:j] + [image_emb] + cached_images[j + 1:])
        texts = torch.cat(cached_texts[:j] + [text_emb] + cached_texts[j + 1:])
        scale = scale.detach() + (scale - scale.detach()) / k
        engine.backward(contrastive_loss(images, texts, scale), scale_wrt_gas=False)
        watch.lap("forward_backward")
        engine.step()  # a real update only after the last micro batch
        watch.lap("optimizer")
    refresh_fp32_logit_scale(engine)
    return after_update(loss, cached[0][2])

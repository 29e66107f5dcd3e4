"""The peer: the same architecture trained by OpenCLIP's own trainer (`open-clip-torch`, the
`bench` extra) on the same synthetic batch, interleaved with flip-ds in one run.

Its step is `open_clip_train.train.train_one_epoch` itself, over a loader of `steps` copies of
the batch: its model, its `ClipLoss`, torch's AdamW with OpenCLIP's parameter groups, its
autocast for bf16 ('amp_bf16'; weights stay fp32) and `PatchDropout` for masking, which is what
its `--force-patch-dropout` configures.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import torch

from flip_ds import distributed
from flip_ds.bench.cases import timed
from flip_ds.models.config import ModelConfig

OPENCLIP_PRECISION = {"bf16": "amp_bf16", "fp32": "fp32"}  # flip-ds precision -> OpenCLIP's --precision
# OpenCLIP's defaults for ViT models (open_clip_train.params): lr, betas, eps, weight decay
LR, BETAS, EPS, WEIGHT_DECAY = 5e-4, (0.9, 0.98), 1e-6, 0.2
LOG_NEVER = 10**9  # its log line (with a .item() host sync) still comes at a block's first and last step


def openclip_model_config(cfg: ModelConfig, vocab_size: int, patch_dropout: float) -> dict[str, Any]:
    """OpenCLIP's model config for flip-ds's tower sizes (for B/16 its built-in 'ViT-B-16' with the
    context length forced to ours, as `--force-context-length` does).

    Same widths, depths, heads, MLP ratio, patch, resolution, context and vocabulary, so both
    stacks do the same model FLOPs per sample. What differs is not FLOPs: OpenCLIP pools the CLS
    token and keeps a learned position embedding and a pre-LayerNorm; its text tower is causal
    and pools the arg-max token, ours bidirectional with a padding mask pooled at token 0 (both
    compute the full context x context attention).
    """
    s = cfg.sizes
    return {
        "embed_dim": s.embed_dim,
        "vision_cfg": {"image_size": cfg.resolved_image_size, "patch_size": s.patch_size, "width": s.vision_width,
                       "layers": s.vision_depth, "head_width": s.vision_width // s.vision_heads,
                       "mlp_ratio": s.vision_mlp_ratio, "patch_dropout": patch_dropout},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": vocab_size, "width": s.text_width,
                     "heads": s.text_heads, "layers": s.text_depth, "mlp_ratio": s.text_mlp_ratio},
    }


class _RepeatedBatch:
    """What `train_one_epoch` reads as `data["train"]` (open_clip_train.data.DataInfo, whose module
    needs pandas for its CSV datasets): a loader of `steps` copies of one batch."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> None:
        self.dataloader = self
        self.batch, self.num_batches, self.num_samples = batch, steps, steps * batch[0].shape[0]

    def set_epoch(self, epoch: int) -> None:
        pass  # one fixed batch: nothing to reshuffle

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter([self.batch] * self.num_batches)


class OpenClipTrainer:
    """OpenCLIP's model and optimizer, on rank 0 only, with all of the node's threads."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, batch: tuple[torch.Tensor, torch.Tensor], device: str,
                 threads: int) -> None:
        import open_clip

        self.device, self.threads = device, threads
        self.rank = distributed.rank()
        self.batch = (batch[0].float(), batch[1])  # OpenCLIP's inputs are fp32 under autocast
        if self.rank != 0:
            return
        torch.manual_seed(0)
        # Built with dropout on so the PatchDropout module exists; each case sets its ratio
        self.model = open_clip.model.CLIP(**openclip_model_config(cfg, vocab_size, patch_dropout=0.5),
                                          output_dict=True).to(device)
        self.loss = open_clip.ClipLoss()
        # open_clip_train.main's parameter groups: no weight decay on gains, biases, logit scale
        exclude = [p for n, p in self.model.named_parameters()
                   if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
        excluded = {id(p) for p in exclude}
        rest = [p for p in self.model.parameters() if id(p) not in excluded]
        self.optimizer = torch.optim.AdamW([{"params": exclude, "weight_decay": 0.0},
                                            {"params": rest, "weight_decay": WEIGHT_DECAY}],
                                           lr=LR, betas=BETAS, eps=EPS)

    def train_steps(self, steps: int, precision: str, mask: float) -> None:
        from open_clip_train.train import train_one_epoch

        self.model.visual.patch_dropout.prob = mask  # what --force-patch-dropout sets; 0 turns it off
        args = argparse.Namespace(device=self.device, precision=OPENCLIP_PRECISION[precision], distill=False,
                                  accum_freq=1, skip_scheduler=True, grad_clip_norm=None, horovod=False,
                                  log_every_n_steps=LOG_NEVER, batch_size=self.batch[0].shape[0], world_size=1,
                                  rank=0, local_rank=0, wandb=False)
        train_one_epoch(self.model, {"train": _RepeatedBatch(self.batch, steps)}, self.loss, 0,
                        self.optimizer, None, None, None, args)


class OpenClipStepCase:
    """One OpenCLIP training step at one precision and mask, by rank 0 with every thread of the
    node while the other ranks wait (one process: how OpenCLIP trains on a CPU)."""

    def __init__(self, trainer: OpenClipTrainer, precision: str, mask: float) -> None:
        self.trainer, self.precision, self.mask = trainer, precision, mask
        self.name = f"open_clip {OPENCLIP_PRECISION[precision]} mask {mask:g}"

    def run_block(self, steps: int) -> float:
        trainer = self.trainer
        if trainer.rank != 0:
            return timed(trainer.device, lambda: None, steps)
        threads = torch.get_num_threads()
        torch.set_num_threads(trainer.threads)
        try:
            return timed(trainer.device, lambda: trainer.train_steps(steps, self.precision, self.mask), steps)
        finally:
            torch.set_num_threads(threads)

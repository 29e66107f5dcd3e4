"""Measuring activation memory: the bytes autograd keeps alive for the backward pass.

On a GPU the caching allocator reports peaks; on a CPU nothing does. What is saved for backward
is the quantity that activation checkpointing and masking change, and it can be counted exactly
on any device with saved-tensor hooks, so the planner's estimates are checked against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[Any, int]:
    """Run `fn` (a forward pass); return (its result, bytes of the distinct storages saved for backward).

    Storages of `exclude` (pass the model's parameters: weights are not activations) are not
    counted, and a storage shared by several saved views is counted once.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        # Not `t` itself: a saved output would then hold its own graph through a reference
        # cycle that runs through C++, which the garbage collector cannot free (each call leaked
        # the whole forward's activations). A detached alias keeps the data and no graph.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(saved.values())

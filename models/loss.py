"""Causal-LM loss and token accuracy with the label shift done right.

Position ``t`` predicts token ``t + 1``. The shift is done on the labels, never on the logits: the
client sends ``targets = labels[:, 1:]`` (int32, -100 where there is nothing to predict), and the
loss pads them with one -100 column so the ``(batch, seq, vocab)`` logits are used as they are,
without a copy. (Comparing unshifted positions gives the near-zero "accuracy" seen in some peers.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.datasets import IGNORE_INDEX


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """What position ``t`` must predict: ``labels[:, t + 1]``, as int32 ``(batch, seq - 1)``."""
    return labels[:, 1:].to(torch.int32)


def _flat(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    full = F.pad(targets.long(), (0, 1), value=IGNORE_INDEX)  # the last position predicts nothing
    return logits.reshape(-1, logits.shape[-1]), full.reshape(-1)


def target_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token-mean cross-entropy, number of target tokens): the training objective, no argmax."""
    flat_logits, flat_targets = _flat(logits, targets)
    loss_sum = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    n_tokens = (flat_targets != IGNORE_INDEX).sum()
    return loss_sum / n_tokens.clamp(min=1), n_tokens


def target_stats(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of target tokens, number predicted right) for one eval batch."""
    flat_logits, flat_targets = _flat(logits, targets)
    loss_sum = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = flat_targets != IGNORE_INDEX
    correct = ((flat_logits.argmax(-1) == flat_targets) & valid).sum()
    return loss_sum, valid.sum(), correct


def token_stats(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``target_stats`` from unshifted labels (the label at each position is that position's token)."""
    return target_stats(logits, shift_targets(labels))


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``target_loss`` from unshifted labels."""
    return target_loss(logits, shift_targets(labels))

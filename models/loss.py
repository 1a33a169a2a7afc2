"""Causal-LM loss and token accuracy with the label shift done right.

Position ``t`` predicts token ``t + 1``: logits ``[:, :-1]`` are compared with labels ``[:, 1:]``,
ignoring -100. (Comparing unshifted positions gives the near-zero "accuracy" seen in some peers.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.datasets import IGNORE_INDEX


def token_stats(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of target tokens, number predicted right) for one batch."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).long()
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = shift_labels != IGNORE_INDEX
    n_tokens = valid.sum()
    correct = ((shift_logits.argmax(-1) == shift_labels) & valid).sum()
    return loss_sum, n_tokens, correct


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-mean loss (the training objective) plus the token count and correct count."""
    loss_sum, n_tokens, correct = token_stats(logits, labels)
    return loss_sum / n_tokens.clamp(min=1), n_tokens, correct

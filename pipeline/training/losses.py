"""The objective: CTC over a model's steps, or cross-entropy per position for fixed-length heads."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, ctc: bool,
                  reduction: str = "mean") -> torch.Tensor:
    """`targets`: the labels' class ids concatenated, `lengths` each label's length. `reduction`
    "none" gives one loss per image (CTC only)."""
    log_probs = logits.float().log_softmax(-1)
    if ctc:
        steps = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
        return F.ctc_loss(log_probs.transpose(0, 1), targets, steps, lengths.cpu(), blank=0,
                          reduction=reduction, zero_infinity=True)
    # fixed positions: pad each label with class 0 ("no character") up to the model's length
    padded = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
    positions = torch.arange(logits.shape[1], device=logits.device)[None, :] < lengths.to(logits.device)[:, None]
    padded[positions] = targets.to(logits.device)
    return F.nll_loss(log_probs.flatten(0, 1), padded.flatten())

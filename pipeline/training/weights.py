"""The optimizer's groups for fine-tuning on few labels (train.trunk_lr): the trunk at a fraction of
the learning rate of the output layer, whose rows may be new. A moving average of the weights and a
pull toward the pretrained ones (L2-SP) were measured beside it and did not pay (docs/benchmarks.md).
"""
from __future__ import annotations

from torch import nn

from pipeline.model.transfer import is_output_layer


def parameter_groups(model: nn.Module, weight_decay: float, trunk_lr: float) -> list[dict]:
    """AdamW's groups: the output layer at the full learning rate and the trunk at `trunk_lr` of it
    (each group's `lr_scale`); 1-d parameters (biases, norm weights) without weight decay."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # train.freeze
            continue
        scale = 1.0 if is_output_layer(name) else trunk_lr
        decay = 0.0 if p.ndim == 1 else weight_decay
        groups.setdefault((scale, decay), []).append(p)
    return [{"params": params, "lr_scale": scale, "weight_decay": decay} for (scale, decay), params in groups.items()]

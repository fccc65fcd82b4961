"""What fine-tuning on few labels does with the weights besides the optimizer's step:

- `WeightAverage` (train.ema): an exponential moving average of the weights, which val reads and
  models/model.pt keeps; a run that memorises its labels ends on a noisy point, the average on a
  smoother one.
- `PretrainedAnchor` (train.l2sp): after each step every trunk weight is pulled toward its value at
  train.init_from (L2-SP, decoupled as AdamW decouples its weight decay), so that few labels move
  the trunk less far from what it learnt on many.
- `parameter_groups` (train.trunk_lr): the trunk at a fraction of the learning rate of the output
  layer, whose rows may be new.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.model.transfer import is_output_layer


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold in the current weights; early on the average forgets faster (decay (1+n)/(10+n))."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, current in zip(self.model.state_dict().values(), model.state_dict().values()):
            if average.dtype.is_floating_point:
                average.lerp_(current.detach(), 1 - decay)
            else:  # e.g. batch norm's count of batches
                average.copy_(current)

    def state_dict(self) -> dict:
        return {"weights": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = state["updates"]


class PretrainedAnchor:
    def __init__(self, model: nn.Module, strength: float):
        self.strength = strength
        self.anchor = {name: p.detach().clone() for name, p in model.named_parameters()
                       if p.requires_grad and not is_output_layer(name)}

    def holds(self, name: str) -> bool:
        return name in self.anchor

    @torch.no_grad()
    def pull(self, model: nn.Module, lr: float) -> None:
        """Move each anchored weight lr x strength of the way back to its pretrained value."""
        step = min(1.0, lr * self.strength)
        for name, p in model.named_parameters():
            if name in self.anchor:
                p.lerp_(self.anchor[name], step)


def parameter_groups(model: nn.Module, weight_decay: float, trunk_lr: float,
                     anchor: PretrainedAnchor | None = None) -> list[dict]:
    """AdamW's groups: the output layer at the full learning rate and the trunk at `trunk_lr` of it
    (each group's `lr_scale`); 1-d parameters (biases, norm weights) and anchored ones without
    weight decay (the anchor pulls those toward their pretrained values instead of toward zero)."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # train.freeze
            continue
        scale = 1.0 if is_output_layer(name) else trunk_lr
        decay = 0.0 if p.ndim == 1 or (anchor is not None and anchor.holds(name)) else weight_decay
        groups.setdefault((scale, decay), []).append(p)
    return [{"params": params, "lr_scale": scale, "weight_decay": decay} for (scale, decay), params in groups.items()]

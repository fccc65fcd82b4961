"""Fine-tuning from a checkpoint whose charset differs: the trunk is kept whole; the output
layer keeps its rows for the characters both charsets share (and the CTC blank), while new
characters start from the layer's fresh initialisation."""
from __future__ import annotations

from torch import nn

from pipeline.errors import PipelineError
from pipeline.model.ddddocr import PACKAGED_TRUNK, packaged_weights

CLASS_ROWS = "classifier"  # CTC models' output layer: one row per class (blank first)
POSITION_ROWS = "heads"  # multihead's: rows are position x class; kept only for the same charset


def is_output_layer(parameter_name: str) -> bool:
    """Whether a parameter belongs to the output layer, whose rows are the classes."""
    parts = parameter_name.split(".")
    return len(parts) > 1 and parts[-2] in (CLASS_ROWS, POSITION_ROWS)


def carry_weights(model: nn.Module, state: dict, old_chars, new_chars: str, source: str,
                  lower_rows: bool = False) -> list[str]:
    """Load `state` (trained with `old_chars`, a string or a list of characters) into `model`
    (built for `new_chars`); return the characters that start fresh. `lower_rows`: a letter whose
    other case `new_chars` lacks (a case-folded charset) takes the old lower-case letter's row,
    for a source that answers in lower case (ddddocr's)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise PipelineError(f"train.init_from: {source} lacks {missing[0]} (and {len(missing) - 1} more tensors)")
    old_row = {c: i + 1 for i, c in enumerate(old_chars)}
    if lower_rows:
        old_row |= {c: old_row[c.lower()] for c in new_chars if c.swapcase() not in new_chars and c.lower() in old_row}
    rows = [0] + [old_row.get(c) for c in new_chars]  # new class -> old class, or None for a new character
    loaded = {}
    for key, fresh in own.items():
        old, module = state[key], key.split(".")[-2]
        if module == CLASS_ROWS:
            new = fresh.clone()
            for j, i in enumerate(rows):
                if i is not None:
                    new[j] = old[i]
            loaded[key] = new
        elif module == POSITION_ROWS and old_chars != new_chars:
            loaded[key] = fresh
        elif old.shape != fresh.shape:
            raise PipelineError(f"train.init_from: {source}: {key} is {tuple(old.shape)}, the model needs "
                                f"{tuple(fresh.shape)}")
        else:
            loaded[key] = old
    model.load_state_dict(loaded)
    return [c for c, i in zip(new_chars, rows[1:]) if i is None]


def from_packaged_trunk(model: nn.Module, charset: str) -> list[str]:
    """Load ddddocr's weights from the installed wheel into `model` (arch ddddocr, height 64,
    channels 1, hidden 512), its output layer cut to `charset`; letters of a case-folded charset
    take ddddocr's lower-case rows (zero-shot on claptcha, 0-9A-Z: 22.3% from them, 5.7% from the
    upper-case ones). Returns the characters that start fresh."""
    state, classes = packaged_weights()
    return carry_weights(model, state, classes[1:], charset, PACKAGED_TRUNK, lower_rows=True)

"""What `evaluate(model)` returned, read as {metric name: value}.

The user's function may return a number, a 0-d tensor, or a dict of them; anything else (a
function that forgot its `return`, a formatted string) is named with the fix instead of failing
inside float() with a message that names neither evaluate nor the value. It is called with the
model in evaluation mode (`evaluated`), whether or not the function sets it.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn

from ..errors import TrainingError
from ..model_call import evaluating


def evaluated(evaluate, model: nn.Module, metric: str) -> dict:
    """`evaluate(model)` read as {name: value}, called with the model in evaluation mode and every module's
    mode put back after. Why: a function that does not call model.eval() itself (nothing asks it to) read
    the model with dropout on, and its batches moved the BatchNorm statistics the run keeps and stores."""
    with evaluating(model):
        return read_metrics(evaluate(model), metric)


def _number(value, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"{value!r:.80}"
    raise TrainingError(f"evaluate() returned {shown}{where}; return a number or a dict of numbers, e.g. "
                        "{'accuracy': 0.97} (a function without `return` gives None)")


def read_metrics(result, metric: str) -> dict:
    """{name: float} from evaluate()'s result; a bare number is `metric` (training.metric). In a
    dict, one-element tensors become floats and `metric`, the one training selects on, must be a
    number; other entries are kept as they are (a note, a confusion matrix)."""
    if not isinstance(result, dict):
        return {metric: _number(result, "")}
    out = {str(k): float(v.detach()) if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in result.items()}
    if metric in out:
        out[metric] = _number(out[metric], f" for '{metric}' (training.metric)")
    return out

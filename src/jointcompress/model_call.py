"""One way to feed a model its inputs, for every place that runs the user's model.

Inputs are a tensor (`model(x)`), a dict (`model(**inputs)`: Hugging Face batches, or any model
whose forward takes named inputs) or a tuple / list (`model(*inputs)`: a model with several
positional inputs, as example inputs and artifacts record them). Training, tracing the channel
graph, checking groups, finalizing and distilling all call the model through this, so a model
that trains also traces and finalizes.
"""
from __future__ import annotations

import torch.nn as nn


def call_model(model: nn.Module, inputs):
    """model(**inputs) for a dict, model(*inputs) for a tuple or list, model(inputs) otherwise."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)

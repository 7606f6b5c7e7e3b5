"""The caller's own training loop around a compression session, as docs/your-model.md writes it."""
from __future__ import annotations

import torch
import torch.nn as nn

import jointcompress


def train_in_own_loop(model: nn.Module, recipe: dict, x: torch.Tensor, y: torch.Tensor, steps: int = 3):
    """`steps` full-batch steps of the documented loop; returns the session (not finalized)."""
    s = jointcompress.prepare(model, recipe, total_steps=steps, example_inputs=x[:2])
    opt = torch.optim.Adam(s.param_groups(lr=1e-3))
    s.bind(opt)
    for _ in range(steps):
        loss = s.loss(model(x), (x, y))
        opt.zero_grad()
        s.backward(loss)
        s.before_step()
        opt.step()
        s.after_step()
    return s

"""Whole residual blocks of a CNN, faded into the identity while the rest of the model learns.

Dropping a block at once costs the model what the block computed: the small ResNet's first
block removed from a trained teacher leaves 7% accuracy, and 469 distillation steps bring it
back to 95% only. Here the block's output is blended into its input, y = x + (1 - fade)(f(x) - x),
with `fade` going 0 -> 1 (cubic, like the sparsity ramps) over the technique's window, so the
layers after it learn to read x while f(x) still helps; at fade 1 the block is exactly the
identity and `finalize` replaces it by nn.Identity (block_drop.collapse_faded), logits unchanged.
Which blocks can go is checked on the example input (block_drop.residual_blocks): a residual
block whose output has its input's shape.
"""
from __future__ import annotations

from .. import schedules
from ..block_drop import BlockFade, check_droppable
from .base import RunContext, Technique


class PruneBlocks(Technique):
    kind = "prune_blocks"
    order = 4  # before the channel masks, so their groups are traced through the faded blocks

    def __init__(self, config):
        super().__init__(config)
        self.hooks: dict[str, BlockFade] = {}

    def setup(self, ctx: RunContext) -> None:
        check_droppable(ctx.model, ctx.example_inputs, list(self.config.blocks))
        for name in self.config.blocks:
            hook = BlockFade(name)
            ctx.model.get_submodule(name).register_forward_hook(hook)  # finalize finds it by its type
            self.hooks[name] = hook
        self.attached = True
        self.on_step(ctx)

    def on_step(self, ctx: RunContext) -> None:
        if self.frozen:
            return
        fade = schedules.ramp(1.0, schedules.progress(ctx.step, *self.window))
        for hook in self.hooks.values():
            hook.fade = fade

    def at_target(self) -> bool:
        return all(h.fade >= 1.0 for h in self.hooks.values())

    def metrics(self) -> dict[str, float]:
        return {"block_fade": min((h.fade for h in self.hooks.values()), default=1.0)}

    def state_dict(self) -> dict:
        return {"fade": {n: h.fade for n, h in self.hooks.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name, fade in state.get("fade", {}).items():
            if name in self.hooks:
                self.hooks[name].fade = float(fade)

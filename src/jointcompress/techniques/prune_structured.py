"""Structured pruning: whole output neurons of Linear layers and output channels of convolutions (1-D, 2-D, 3-D).

Channels are scored per *coupled group* (graph.py): a conv, its BatchNorm and every layer
joined to it by a residual addition share one score per channel and one mask, so that a
removed channel is exactly zero everywhere it appears and `finalize` can physically remove
it without changing the function. Groups where that would not hold (a LayerNorm / GroupNorm /
RMSNorm over the channels, embeddings, channels split into attention heads, ...) are left out;
`skipped` lists every layer that is not pruned with the reason (graph.discover_groups, also
shown by `jointcompress dry-run`). Masks follow the same soft -> exactly binary schedule as
unstructured learned masks.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .. import schedules
from ..block_drop import groups_that_stay
from ..errors import RecipeError
from ..graph import ChannelGroup, channel_norms, discover_groups
from ..layer_types import BATCH_NORMS
from .base import RunContext
from .masks import ApplyMask, ScoredMask, allocate, floor_warning, floored_layers, layer_keep_count, topk_keep
from .pruning import PruningTechnique, key as _key


class NoChannelGroupError(RecipeError):
    """prune_structured found no channel group it may prune in the model (a latency target, which adds the technique
    itself, says so in its own words); `skipped`: each layer and why it keeps its width."""

    def __init__(self, message: str, skipped: list[tuple[str, str]]):
        super().__init__(message)
        self.skipped = skipped


class PruneStructured(PruningTechnique):
    score_group = "channel_scores"
    kind = "prune_structured"
    order = 5

    def __init__(self, config):
        super().__init__(config)
        self.groups: list[ChannelGroup] = []
        self.skipped: list[tuple[str, str]] = []
        self.appliers: list[tuple[nn.Module, str, ApplyMask]] = []

    def setup(self, ctx: RunContext) -> None:
        self.groups, self.skipped = discover_groups(ctx.model, ctx.example_inputs, self.config.targets, self.config.exclude)
        # prune_blocks (set up first) fades blocks out: groups named and rooted by layers that stay, as
        # the model without the blocks names them (its allocators' layer_sparsity keys)
        self.groups, inside = groups_that_stay(ctx.model, ctx.example_inputs, self.groups)
        self.skipped += inside
        if not self.groups:
            raise NoChannelGroupError(self._nothing_to_prune(ctx.model), list(self.skipped))
        self._warn_unknown_groups()
        modules = dict(ctx.model.named_modules())
        for g in self.groups:
            scores = channel_norms(g, modules, _weight_unless_batch_norm)
            if self.config.criterion == "learned":
                scores = scores / scores.mean().clamp_min(1e-12)
            mask = ScoredMask(scores, learned=self.config.criterion == "learned")
            mask.group = g  # finalize() reads the group to remove the channels physically
            self.masks[_key(g.name)] = mask
            for m in g.out_members():
                layer = modules[m.module]
                for pname in ("weight", "bias"):
                    if getattr(layer, pname, None) is None:
                        continue
                    applier = ApplyMask(mask, dim=0, idxs=m.idxs, root_idxs=m.root_idxs)
                    parametrize.register_parametrization(layer, pname, applier)
                    self.appliers.append((layer, pname, applier))
        self.attached = True
        self._warn_floored()
        self._update(ctx.step, force=True)

    def _warn_floored(self) -> None:
        """Scope layer never empties a group (masks.layer_floor: min_keep of its channels, at least one; an
        empty group could not be removed by finalize): said once, when attached, naming the groups the
        floor keeps less sparse than the recipe's sparsity. (layer_sparsity budgets are capped at one
        channel kept per group in _keeps, and come from allocators that respect their own floors.)"""
        if self.config.scope != "layer" or self.config.layer_sparsity or self.config.sparsity is None:
            return
        sizes = {g.name: g.channels for g in self.groups}
        floored = floored_layers(sizes, dict.fromkeys(sizes, self.config.sparsity), self.config.min_keep)
        if floored:
            warnings.warn(floor_warning("prune_structured", "channels", "channel groups",
                                        f"prune_structured.sparsity {self.config.sparsity:g}", self.config.min_keep,
                                        sizes, floored), stacklevel=3)

    def on_step(self, ctx: RunContext) -> None:
        if not self.frozen:
            self._update(ctx.step, modules=dict(ctx.model.named_modules()))

    def _update(self, step: int, force: bool = False, modules=None) -> None:
        p = schedules.progress(step, *self.window)
        due = force or p >= 1.0 or (step - self.window[0]) % schedules.update_interval(self.config.update_every, self.window) == 0
        if not due or (self._final_done and p >= 1.0):
            return
        self.current_sparsity = schedules.ramp(self.config.sparsity, p, self.config.schedule)
        if self.config.criterion == "magnitude" and modules is not None:
            for g in self.groups:
                self.masks[_key(g.name)].scores.copy_(channel_norms(g, modules, _trained_weight_unless_batch_norm))
        temp = 0.0 if self.config.criterion == "magnitude" else schedules.temperature(self.config.temperature, p)
        for m, keep in zip(self._group_masks(), self._keeps(p)):
            m.set_keep(keep, temp)
        self._final_done = p >= 1.0

    def _nothing_to_prune(self, model: nn.Module) -> str:
        """Why no group is left, and the fix that applies: widening targets helps only where they name fewer than
        all layers (an LSTM model with targets ['*'] was told to widen them); recurrent layers need converting."""
        from ..recurrent import RECURRENT

        shown = "; ".join(f"{name or '(the model itself)'}: {reason}" for name, reason in self.skipped[:6])
        more = f"; ... ({len(self.skipped)} in all)" if len(self.skipped) > 6 else ""
        fixes = [] if self.config.targets == ["*"] and not self.config.exclude else ["widen targets (or exclude)"]
        rnn = [name for name, m in model.named_modules() if isinstance(m, RECURRENT)]
        if rnn:
            fixes.append(f"convert the recurrent layers ({', '.join(rnn[:4])}) with rnn_to_linear first")
        fixes.append("use prune_unstructured / quant_lsq for this model, or remove the technique "
                     "(`jointcompress dry-run` gives every layer's reason)")
        return (f"prune_structured: no prunable channel group matches targets {self.config.targets} "
                f"(skipped: {shown or 'no layer with channels to prune'}{more}); " + "; ".join(fixes))

    def _warn_unknown_groups(self) -> None:
        """layer_sparsity keys that name no group pruned here were ignored without a word: a typo, or an
        allocation made on another trace of the model (a latency target's, with prune_blocks and an exclude
        that names a layer of the dropped block), whose cut is then never made."""
        names = {g.name for g in self.groups}
        unknown = [n for n in (self.config.layer_sparsity or {}) if n not in names]
        if unknown:
            warnings.warn(f"prune_structured.layer_sparsity names {', '.join(map(repr, unknown[:4]))}, no channel group "
                          f"it prunes in this model (its groups: {', '.join(sorted(names)[:8])}"
                          f"{', ...' if len(names) > 8 else ''}); those entries are not used (`jointcompress dry-run` "
                          "lists the groups)", stacklevel=3)

    def _group_masks(self) -> list[ScoredMask]:
        return [self.masks[_key(g.name)] for g in self.groups]

    def _keeps(self, p: float) -> list[torch.Tensor]:
        """Every group's keep at ramp progress `p`, as the scores rank the channels now."""
        masks = self._group_masks()
        if self.config.layer_sparsity:
            per = self.config.layer_sparsity
            return [
                allocate([m.scores], min(schedules.ramp(per.get(g.name, self.config.sparsity), p, self.config.schedule), 1 - 1 / g.channels), "layer", 0)[0]
                for g, m in zip(self.groups, masks)
            ]
        # scope layer: every group keeps at least max(1, min_keep of its channels) (masks.layer_floor)
        return allocate([m.scores for m in masks], schedules.ramp(self.config.sparsity, p, self.config.schedule),
                        self.config.scope, self.config.min_keep)

    def counts_known(self) -> bool:
        """Whether each group's number of channels at the end of the ramp is known before training: per
        group (scope: layer, or layer_sparsity) it is fixed; under scope: global the scores, learned
        in training, share the channels out between the groups."""
        return bool(self.config.layer_sparsity) or (self.config.scope == "layer" and self.config.sparsity is not None)

    def _fewest_keeps(self) -> list[torch.Tensor]:
        """Every group at the fewest channels scope: global lets it keep (min_keep, at least one)."""
        return [topk_keep(m.scores, max(1, round(m.scores.numel() * self.config.min_keep)))
                for m in self._group_masks()]

    @contextmanager
    def at_end(self):
        """Inside: every mask binary at the end of its ramp, as the scores rank the channels now (each
        group then has the width it will end with; which of its channels go, training decides, and
        does not change the bytes that hang on them: every channel of a group carries the same bias,
        step size and normalization entries). Where the widths are learned (not counts_known), every
        group at its fewest channels instead: no run ends narrower. The masks' state is restored on
        leaving."""
        masks = self._group_masks()
        saved = [{k: b.clone() for k, b in m.named_buffers()} for m in masks]
        try:
            for m, keep in zip(masks, self._keeps(1.0) if self.counts_known() else self._fewest_keeps()):
                m.set_keep(keep, 0.0)
            yield
        finally:
            with torch.no_grad():
                for m, state in zip(masks, saved):
                    for k, b in m.named_buffers():
                        b.copy_(state[k])

    def loss_terms(self, ctx: RunContext) -> dict[str, torch.Tensor]:
        """Group lasso on the channels being removed: sum_c (1 - m_c) * ||W_c||."""
        lam = self.config.regularization
        if lam == 0 or self.frozen:
            return {}
        terms = []
        for layer, pname, applier in self.appliers:
            if pname != "weight" or isinstance(layer, BATCH_NORMS) or applier.last_mask is None:
                continue
            w = layer.parametrizations.weight.original
            norms = (w.flatten(1).pow(2).sum(1) + 1e-12).sqrt()
            terms.append((norms * (1 - applier.last_mask.detach().flatten())).mean())
        return {"sparsity": lam * torch.stack(terms).mean()} if terms else {}

    def at_target(self) -> bool:
        if not self.binary():
            return False
        if self.config.layer_sparsity:
            return True
        # per-group rounding: each group is off by at most half a channel of its own
        slack = 0.5 * len(self.masks) / max(1, self.total_entries())
        target = self.config.sparsity
        if self.config.scope == "layer":  # what the groups reach with their floors (masks.layer_keep_count)
            kept = sum(layer_keep_count(m.hard.numel(), target, self.config.min_keep) for m in self.masks.values())
            target = 1.0 - kept / max(1, self.total_entries())
        return abs(self.achieved_sparsity() - target) <= slack + 1e-3 + 1.0 / min(m.hard.numel() for m in self.masks.values())

    def pruned_channels(self) -> dict[str, list[int]]:
        """Root layer name -> channel indices whose mask is 0 (what finalize removes)."""
        return {g.name: torch.nonzero(self.masks[_key(g.name)].hard == 0).flatten().tolist() for g in self.groups}

    def metrics(self) -> dict[str, float]:
        return {"channel_sparsity": self.achieved_sparsity(), "channel_sparsity_target_now": self.current_sparsity}



def _weight_unless_batch_norm(layer: nn.Module):
    """A producing layer's weight for a channel's magnitude; BatchNorm's scale is left out (it is folded
    into the conv at deployment)."""
    return None if isinstance(layer, BATCH_NORMS) else getattr(layer, "weight", None)


def _trained_weight_unless_batch_norm(layer: nn.Module):
    """The weight under the mask (the parametrization's original), BatchNorm left out."""
    return None if isinstance(layer, BATCH_NORMS) else layer.parametrizations.weight.original

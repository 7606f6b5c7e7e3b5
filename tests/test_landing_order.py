"""size_budget.landing_order: fisher, the landing's cuts by Fisher cost per byte.

The landing (catch-up cuts, the freeze's projection; the trim after it keeps the margin order)
drops the cheapest kept weights first. By margin to the dead zone's edge (the default), a layer whose dead zones the Fisher cost
held at their minimum has its kept weights near the edge and loses them first, cut after cut
(LeNet-5's conv1 at 400x: 305 kept weights to 20). By Fisher cost, the order is in the loss's
units in every layer. Off by default: the order and every cut stay as they were.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError
from torch.nn.utils import parametrize

from jointcompress.recipe import SizeBudget as SizeBudgetConfig
from jointcompress.techniques.base import RunContext
from jointcompress.techniques.size_budget import SizeBudget
from jointcompress.techniques.size_projection import channel_floor
from jointcompress.techniques.zero_level import ZeroLevelLSQWeight
from test_landing import _Tiny  # LeNet-5's conv1 -> fc1 in miniature

TOTAL_STEPS = 20  # window (0, 10), freeze at step 16, a calibration (and catch-up check) every step
FISHER_SCALE = {"conv": 1e3, "fc": 1e-3, "out": 1e-3}  # the conv layer's weights matter most to the loss


def _budget(**config) -> SizeBudget:
    """A budget with the Fisher saliency on, every layer's estimate set (FISHER_SCALE times noise)."""
    torch.manual_seed(0)
    model = _Tiny()
    for m in (model.conv, model.fc, model.out):
        parametrize.register_parametrization(m, "weight", ZeroLevelLSQWeight(m.weight.detach(), bits=4, learn_bits=False))
        m(torch.randn(2, *((1, 8, 8) if isinstance(m, nn.Conv2d) else (m.in_features,))))  # initializes the step
    budget = SizeBudget(SizeBudgetConfig(type="size_budget", target_bytes=1e9, saliency=30.0, **config))
    budget.window = (0, 10)
    budget.setup(RunContext(model=model, example_inputs=torch.randn(2, 1, 8, 8), total_steps=TOTAL_STEPS))
    for name, (_, q) in budget.layers.items():
        q.width_fisher.copy_(FISHER_SCALE[name] * torch.rand(q.width_fisher.shape))
        q.width_fisher_seen.fill_(True)
    return budget


def _land(budget: SizeBudget, share_of_start: float) -> dict[str, int]:
    """From the window's end to the freeze with the state far over its aim: the budget's own
    catch-up cuts at every check, then the freeze's projection. Returns the kept weights per layer."""
    budget.config.target_bytes = share_of_start * budget.calibrated_hard()
    ctx = RunContext(model=budget.model, example_inputs=None, total_steps=TOTAL_STEPS)
    for step in range(budget.window[1], budget.freeze_step + 1):
        ctx.step = step
        budget.on_step(ctx)
    budget.freeze()
    return {name: int(q.keep.sum()) for name, (_, q) in budget.layers.items()}


def test_fisher_order_offers_the_least_loss_per_byte_first_and_protects_the_costliest():
    budget = _budget(landing_order="fisher")
    per_byte = budget.bytes_per_weight()
    owners, where, freed = budget.ranking(drop=True)
    names = list(budget.layers)
    price = torch.empty(len(where))
    for i, (m, q) in enumerate(budget.layers.values()):
        w = m.parametrizations.weight.original.detach()
        cost = budget.saliency.cost(q, w)
        mine = where[owners == i]
        assert not channel_floor(q.hard_keep(w), cost).flatten()[mine].any()  # the floor keeps the costliest
        price[owners == i] = cost.flatten()[mine] / per_byte[i]
    assert (price[1:] >= price[:-1]).all()  # Fisher cost per byte freed, cheapest first, across layers
    assert torch.equal(freed, per_byte[owners])
    conv = names.index("conv")
    first_conv = int(torch.nonzero(owners == conv)[0])
    assert (owners[:first_conv] != conv).all() and first_conv >= int((owners != conv).sum())  # conv goes last

    margin_owners, _, _ = _budget().ranking(drop=True)  # the default order offers conv's weights early
    assert int(torch.nonzero(margin_owners == conv)[0]) < first_conv


def test_the_fisher_landing_spares_the_layer_the_loss_needs_and_still_lands():
    budget = _budget(landing_order="fisher")
    conv, q = budget.layers["conv"]
    start = int(q.hard_keep(conv.parametrizations.weight.original).sum())
    by_margin = _land(_budget(), 0.75)
    by_fisher = _land(budget, 0.75)
    assert by_fisher["conv"] == start  # conv keeps every weight it had ...
    assert by_margin["conv"] < 0.6 * start  # ... where the margin order took about half of them
    cuts = [e for e in budget.events if e["event"] in ("size_catch_up", "size_projection")]
    assert len(cuts) >= 4 and cuts[-1]["kept"] == by_fisher  # the history says what each cut left, per layer
    assert [e["kept"]["fc"] for e in cuts] == sorted((e["kept"]["fc"] for e in cuts), reverse=True)
    assert not budget.drops_by_fisher()  # after the freeze (the trim) the margin orders again
    assert [torch.equal(a, b) for a, b in zip(budget.ranking(drop=True), _frozen_margin_ranking(budget))] == [True] * 3
    assert by_fisher["fc"] < by_margin["fc"]  # the bytes came from the layer that matters least
    budget.calibrate(budget.model)
    assert abs(budget.calibrated_hard() / budget.aim() - 1) < 0.01  # on the aim all the same


def _frozen_margin_ranking(budget: SizeBudget) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The margin order of a budget in the same state (the trim's order)."""
    budget.config.landing_order = "margin"
    try:
        return budget.ranking(drop=True)
    finally:
        budget.config.landing_order = "fisher"


def test_off_by_default_the_order_is_the_margin_and_fisher_needs_the_saliency():
    assert SizeBudgetConfig(type="size_budget").landing_order == "margin"
    plain, explicit = _budget(), _budget(landing_order="margin")
    assert not plain.drops_by_fisher()
    per_byte = plain.bytes_per_weight()
    owners, where, freed = plain.ranking(drop=True)
    margin_price = torch.empty(len(where))
    for i, (m, q) in enumerate(plain.layers.values()):
        w = m.parametrizations.weight.original
        margin_price[owners == i] = q.edge_distance(w).detach().expand_as(w).flatten()[where[owners == i]] / per_byte[i]
    assert (margin_price[1:] >= margin_price[:-1]).all()  # the margin per byte, as before the option existed
    assert all(torch.equal(a, b) for a, b in zip((owners, where, freed), explicit.ranking(drop=True)))
    with pytest.raises(ValidationError, match="saliency > 0"):
        SizeBudgetConfig(type="size_budget", landing_order="fisher")

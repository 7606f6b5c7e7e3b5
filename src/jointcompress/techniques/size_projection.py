"""Landing on the target bytes: the size budget's cuts before the freeze (`catch_up`) and its
projection at and after the freeze (`project`), as a mixin of `size_budget.SizeBudget`.

Why apart from the budget: the budget is a constraint inside training (estimate, multiplier,
warm-up); landing is a search over discrete gate decisions against the real file, with its own
rules: weights barely kept per byte they free go first, across layers; every output channel
keeps its strongest weights (a projection thins a path, it never cuts one); the count is found
by bisection on the artifact writer's bytes. The mixin uses the budget's `layers`, `aim()`,
`calibrate()`, `calibrated_hard()`, `scale`, `events`, `window`, `freeze_step`,
`calibration_interval`, `config`, `frozen` and `saliency`.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from . import learned_width as lw
from .size_estimate import finalized_copy, fixed_part_hint, sparse_layer_bytes, sparse_layer_bytes_with_slopes

UNDER_WARNING = 0.05  # a file this far under the aim at the freeze is said (warn_under)
PROJECTION_SLACK = 0.003  # the projection lands within 0.3% of the aim (fine-tuning moves the coding ~0.5%)
# a projection never cuts a path: every output channel that keeps weights keeps at least its strongest
# CHANNEL_FLOOR of them, and at least CHANNEL_SHARE of what it kept before (it thins, it never empties)
CHANNEL_FLOOR = 1
CHANNEL_SHARE = 0.5
MAX_PROBES = 24  # measurements of the weights file one projection may take
WIDENING_ROUNDS = 3  # under the aim at the freeze: rounds of single-bit raises of learned widths (_widen)
# between the window's end and the freeze, a state more than CATCH_UP_TOLERANCE over the aim is
# brought down in steps (the multiplier alone could not get there while the LR decays)
CATCH_UP_TOLERANCE = 0.02
# ... and one more than LATE_EXCESS over it when the window ends is said in a warning: cut that late, in
# few steps, a large excess costs accuracy (the small ViT with 2,000 images: 67% over, docs/joint.md)
LATE_EXCESS = 0.25


def channel_floor(keep: torch.Tensor, margin: torch.Tensor, floor: int = CHANNEL_FLOOR,
                  share: float = CHANNEL_SHARE) -> torch.Tensor:
    """The kept weights a projection may not drop: in every output channel (dim 0) that keeps
    weights, its strongest max(floor, ceil(share * kept)) by margin to the dead zone's edge.

    Why per channel: a layer-wide floor let a global ranking strip LeNet-5's conv1 to 3 of its
    500 weights (17 of 20 filters dead, every path through them cut) while the large layer it
    fed kept everything; a channel that loses its last weight cuts every path through it.
    """
    rows = keep.reshape(keep.shape[0], -1)
    kept = rows.sum(1)
    protect = torch.maximum(torch.full_like(kept, floor), torch.ceil(share * kept).long()).minimum(kept)
    strength = margin.reshape(rows.shape).float().masked_fill(~rows, float("-inf"))
    rank = torch.empty_like(rows, dtype=torch.long)
    order = torch.argsort(strength, dim=1, descending=True, stable=True)
    rank.scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order).contiguous())
    return ((rank < protect.unsqueeze(1)) & rows).view_as(keep)



def set_flat(tensor: torch.Tensor, flat_index: torch.Tensor, value) -> None:
    """`tensor.view(-1)[flat_index] = value` in place, for any memory layout: the decisions index
    weights in their logical (row-major) order, and a channels_last conv weight has no flat view
    (`.view(-1)` raised; a reshape would write into a copy and lose the cut)."""
    if tensor.is_contiguous():
        tensor.view(-1)[flat_index] = value
    else:
        tensor[torch.unravel_index(flat_index, tensor.shape)] = value

class Landing:
    """The size budget's landing on its aim (see the module's docstring)."""

    @torch.no_grad()
    def project(self, model: nn.Module, event: str = "size_projection") -> bool:
        """Land on the aim: drop kept weights while over it (revive pruned ones while under it),
        in the order of `ranking`, taking as many as the weights file needs. The coding is not
        smooth in the count (a layer changes format or index width; the entropy coder), so the
        count is searched with the writer itself (`_search`, a bisection). A channel keeps at
        least CHANNEL_SHARE of what it kept (never less than its strongest weight); only if the
        aim cannot be met that way is the share relaxed to the single strongest weight. Still
        under the aim at the freeze after the revival, learned widths are raised (`_widen`)."""
        aim = self.aim()
        before = self.calibrated_hard()
        if aim * (1 - PROJECTION_SLACK) <= before <= self.band_top():
            return False
        drop = before > aim
        keeps = [q.hard_keep(m.parametrizations.weight.original) for m, q in self.layers.values()]
        shares = (CHANNEL_SHARE, 0.0) if drop else (0.0,)
        orders = [self.ranking(drop, share) for share in shares]  # before any probe fixes a pattern
        for share, order in zip(shares, orders):
            guess = _first_reaching(order[2], abs(before - aim))
            count, size, probes = self._search(lambda k: self._apply(model, order, k, keeps, drop), len(order[0]),
                                               guess, drop)
            if not drop or size <= self.band_top():
                break
        if not drop and size < before:
            count = 0  # reviving took the file further from the aim (a layer left a sparse format for a cheaper one)
        self._apply(model, order, count, keeps, drop, measure=False)  # the search's last probe may differ
        self.calibrate(model)
        widened = {}
        if not drop and not self.frozen and self.calibrated_hard() < aim * (1 - PROJECTION_SLACK):
            widened, searched = self._widen(model)
            probes += searched
        self._record(event, before, aim, **{"dropped_weights" if drop else "revived_weights": int(count)},
                     channel_share=share, probes=probes, **({"widened": widened} if widened else {}))
        return True

    def band_top(self) -> float:
        """The most a landing accepts: the aim's slack, but never over the target (with a small margin
        the slack reached past it, and a small model's file ended a byte over what was asked)."""
        return min(self.aim() * (1 + PROJECTION_SLACK), float(self.config.target_bytes))

    def _record(self, event: str, before: float, aim: float, **what) -> None:
        self.events.append({"event": event, "bytes_before": round(before), "bytes_after": round(self.calibrated_hard()),
                            "aim_bytes": round(aim), **what, "target_bytes": round(self.config.target_bytes),
                            "kept": self.kept_by_layer()})

    @torch.no_grad()
    def _widen(self, model: nn.Module) -> tuple[dict[str, int], int]:
        """Still under the aim at the freeze after the revival, with learned widths: spend the bytes
        left on precision.

        Why: in a short run the widths can overshoot downwards (the multiplier pushed them down
        faster than it could pull them back; 2 epochs of a small ResNet at 10x froze at 2-3 bits,
        25% under the aim, with little pruned) and reviving pruned weights cannot give those bytes
        back. So the layer whose next bit removes the most rounding noise per byte (the learned
        width's own price, 1/2 F s^2 / 12 per kept weight, lw.noise_cost_slope) gains a bit, then
        the next, as long as the file stays under the aim (a bisection over that order with the
        writer as the judge); each raise re-fits the step and keeps the dead zone's edge, so the
        pattern stays. Returns ({layer: its new width} of the layers raised, files measured)."""
        # learned widths (the revival's probes have fixed every pattern, so learns_width() reads False now)
        layers = [(name, m, q) for name, (m, q) in self.layers.items() if q.learn_bits and q.max_bits > q.min_bits]
        widened, probes = {}, 0
        for _ in range(WIDENING_ROUNDS):  # a raise that overshoots ends a round; a cheaper one may still fit
            gap = self.aim() - self.calibrated_hard()
            plan = self._widening_plan(layers, gap) if gap > self.aim() * PROJECTION_SLACK else []
            raised, searched = self._raise_widths(model, layers, plan, gap) if plan else ({}, 0)
            probes += searched
            if not raised:
                break
            widened.update(raised)
        return widened, probes

    def _raise_widths(self, model: nn.Module, layers, plan: list[tuple[int, float]], gap: float) -> tuple[dict[str, int], int]:
        """The longest prefix of `plan` whose file is not over the aim, applied: ({layer: its new
        width}, files measured)."""
        saved = [(int(q.held_bits), q.log_step.clone(), q.dead_zone_raw.clone(), len(q.width_changes)) for _, _, q in layers]

        def apply(k: int, measure: bool = True) -> float | None:
            for (_, m, q), (held, log_step, dead_zone_raw, changes) in zip(layers, saved):
                q.held_bits.fill_(held)
                q.log_step.copy_(log_step)
                q.dead_zone_raw.copy_(dead_zone_raw)
                del q.width_changes[changes:]
            for i, _ in plan[:k]:
                _, m, q = layers[i]
                q._change_width(m.parametrizations.weight.original.detach(), int(q.held_bits) + 1)
            return float(self.file_bytes(model)["total"]) if measure else None

        guess = _first_reaching(torch.tensor([c for _, c in plan]), gap)
        count, _, probes = self._search(apply, len(plan), guess, drop=False)
        apply(count, measure=False)
        self.calibrate(model)
        return {layers[i][0]: int(layers[i][2].held_bits) for i, _ in plan[:count]}, probes

    def _widening_plan(self, layers, gap: float) -> list[tuple[int, float]]:
        """Single-bit raises (layer index, estimated bytes), the most rounding noise removed per byte
        first, until they would cost twice `gap`; a raise that alone costs more than `gap` is left out."""
        state = []
        for _, m, q in layers:
            w = m.parametrizations.weight.original
            kept = q.hard_keep(w)
            fisher = q.fisher.estimate()
            weights = (fisher if fisher is not None else torch.ones_like(w)) * kept
            noise = float(0.5 * (weights * q.effective_step().detach().pow(2) / 12.0).sum())
            state.append([int(q.held_bits), noise, float(kept.sum()), w.numel(), q.min_bits, q.max_bits, q.nonzero_grid])
        plan, spent = [], 0.0
        while spent < 2 * gap:
            best, best_price = None, 0.0
            for i, (bits, noise, kept, numel, q_min, top, nonzero) in enumerate(state):
                if bits >= top or kept == 0:
                    continue
                now, up = sparse_layer_bytes_with_slopes([kept, kept], [numel, numel], [float(bits), bits + 1.0])[0]
                cost = self.scale * (up - now)
                if cost > gap:
                    continue
                removed = -lw.noise_cost_slope(noise, bits, bits + 1.0, q_min, top, nonzero)  # what one more bit removes
                if best is None or removed / max(cost, 1e-9) > best_price:
                    best, best_price, best_cost, best_removed = i, removed / max(cost, 1e-9), cost, removed
            if best is None:
                break
            state[best][0] += 1
            state[best][1] -= best_removed
            plan.append((best, best_cost))
            spent += best_cost
        return plan

    def _search(self, measure, n: int, guess: int, drop: bool) -> tuple[int, float, int]:
        """The count of decisions that puts the file on the aim: dropping, the fewest whose file
        is not over aim * (1 + slack); reviving, the most. Bisection on `measure(count)` (the
        file's bytes), bracketed from the estimate's `guess`; returns (count, its file's bytes,
        measurements the bisection took)."""
        aim = self.aim()
        band = (aim * (1 - PROJECTION_SLACK), self.band_top())
        sizes: dict[int, float] = {}
        lo, hi = 0, n  # drop: lo over the band, hi assumed not; revive: lo not over it, hi assumed over
        k = min(n, max(1, 2 * guess))
        while True:
            sizes[k] = measure(k)
            if band[0] <= sizes[k] <= band[1]:
                return k, sizes[k], len(sizes)
            if (sizes[k] <= band[1]) == drop:
                hi = k
            else:
                lo = k
            if hi - lo <= 1 or len(sizes) >= MAX_PROBES:
                break
            k = (lo + hi) // 2
        count, probes = (hi if drop else lo), len(sizes)
        if count not in sizes:  # a bracket end never probed (all or none of the decisions)
            sizes[count] = measure(count)
        return count, sizes[count], probes

    def _apply(self, model: nn.Module, order, count: int, keeps: list[torch.Tensor], drop: bool,
               measure: bool = True) -> float | None:
        """Fix the pattern `keeps` with the first `count` decisions of `order` flipped; the file's
        bytes (a finalize and an encode: skipped with `measure=False`)."""
        owners, where = order[0][:count], order[1][:count]
        for i, (m, q) in enumerate(self.layers.values()):
            keep = keeps[i].clone()
            set_flat(keep, where[owners == i], not drop)
            q.fix_pattern(m.parametrizations.weight.original.detach(), keep)
        return float(self.file_bytes(model)["total"]) if measure else None

    @torch.no_grad()
    def warn_missed(self) -> None:
        """Said once, at the freeze, where the projection could not bring the file under the target: a
        channel keeps its strongest weight, so a target under the bytes of one weight per live channel
        (plus what no decision moves) ends over it. The file is what it is, the user hears by how much."""
        now, target = self.calibrated_hard(), self.config.target_bytes
        if now <= target:  # a byte over is over: the user asked for at most the target
            return
        kept, channels, shrunk = self._live_after_finalize()
        self.events.append({"event": "size_target_missed", "bytes": round(now), "target_bytes": round(target),
                            "fixed_bytes": round(self.fixed), "live_channels": channels, "kept": kept})
        warnings.warn(
            f"size_budget: the weights file ends at about {now:,.0f} B (as estimated at the freeze; the saved file's own "
            f"size is said with it), {now - target:,.0f} B ({now / target - 1:.1%}) over the "
            f"{target:,.0f} B target: "
            f"{self.fixed:,.0f} B do not depend on the run's decisions and the landing keeps the strongest weight of each "
            f"of the {channels:,} output channels that still have weights ({sum(kept.values()):,} weights kept). Ask "
            f"for at least this file (target.size_kb >= {math.ceil(now / 10.24) / 100:.2f}, or a lower target.ratio), or lower "
            "quant_lsq.bits" + (fixed_part_hint(shrunk) if shrunk is not None else ""),
            stacklevel=1)  # its caller is torch.no_grad's wrapper: the command line showed that file and line

    def _live_after_finalize(self) -> tuple[dict[str, int], int, nn.Module | None]:
        """Each layer's kept weights, the output channels that still hold one, and the model as the file holds it:
        counted on the model as finalize leaves it, so prune_structured's removed channels count neither as live
        channels nor in the normalization layers' bytes (a 386 B file was said to hold 512 B of BatchNorm)."""
        if self.model is None:
            keeps = [q.hard_keep(m.parametrizations.weight.original) for m, q in self.layers.values()]
            return ({name: int(k.sum()) for name, k in zip(self.layers, keeps)},
                    sum(int(k.flatten(1).any(1).sum()) for k in keeps), None)
        shrunk, _ = finalized_copy(self.model, getattr(self, "example_inputs", None))
        modules = dict(shrunk.named_modules())
        weights = {name: modules[name].weight for name in self.layers if name in modules}
        return ({name: int((w != 0).sum()) for name, w in weights.items()},
                sum(int((w != 0).flatten(1).any(1).sum()) for w in weights.values()), shrunk)

    def warn_under(self) -> None:
        """Said once, at the freeze, where the file ends far under the target after the projection revived
        what it could: the techniques beside the budget (prune_structured's channels, fixed bit-widths) made
        it smaller than asked, and the budget cannot spend bytes on weights that are gone."""
        now, target = self.calibrated_hard(), self.config.target_bytes
        if now >= self.aim() * (1 - UNDER_WARNING) or any(q.learns_width() for _, q in self.layers.values()):
            return
        self.events.append({"event": "size_target_undershot", "bytes": round(now), "target_bytes": round(target)})
        causes, fixes = self._under_causes()
        warnings.warn(
            f"size_budget: the weights file ends at {now:,.0f} B, {1 - now / target:.0%} under the {target:,.0f} B "
            f"target: {causes} left fewer bytes than the target allows. To spend them on accuracy, {fixes}; for a "
            "smaller file, lower target.size_kb (or raise target.ratio)", stacklevel=2)

    def _under_causes(self) -> tuple[str, str]:
        """What made the file small, and what spends the bytes, as this run is set up: it told a run that learned
        its widths (frozen by now, too low after a short run) to learn them, and to lower a prune_structured
        sparsity the recipe did not have."""
        from .masks import has_channel_masks

        learned = any(getattr(q, "learn_bits", False) for _, q in self.layers.values())
        channels = self.model is not None and has_channel_masks(self.model)
        causes = (["prune_structured's channels"] if channels else []) + (
            ["the widths learned (frozen since)"] if learned else ["quant_lsq.bits"])
        fixes = (["lower prune_structured.sparsity"] if channels else []) + (
            ["give the widths more steps to rise (more epochs)"] if learned else
            ["raise quant_lsq.bits or learn the widths (quant_lsq.learn_bits: true with size_budget written in the "
             "recipe: the bare mode: joint form keeps them fixed)"])
        return " and ".join(causes), ", or ".join(fixes)

    def kept_by_layer(self) -> dict[str, int]:
        """Every budgeted layer's kept weights now: the landing's events record them after each cut,
        so a history shows which layer the cuts took from (LeNet-5's conv1 emptied over the catch-up)."""
        return {name: int(q.hard_keep(m.parametrizations.weight.original).sum()) for name, (m, q) in self.layers.items()}

    def drops_by_fisher(self) -> bool:
        """With size_budget.landing_order: fisher, the cuts up to and at the freeze (catch-up, the
        freeze's projection) go by the Fisher cost of removing a weight (saliency.cost, OBD's
        1/2 F w^2) per byte freed, not by its margin to the dead zone's edge. Why: the margin is in
        each layer's own steps. Where the saliency held a layer's dead zones at their minimum
        (LeNet-5's conv1 at 400x: its weights worth more to the loss than their bytes all window
        long) its kept weights sit near the edge and were cut first, cut after cut, down to one per
        filter, while a layer whose dead zones had opened wide kept only weights far outside them;
        the Fisher cost is in the loss's units in every layer, the same price the dead zones were
        trained against. The trim after the freeze keeps the margin order: the estimate stops at the
        freeze, the margins follow the fine-tuned values whose coding the trim corrects (by Fisher
        cost it did worse on LeNet-300-100 at 100x in a probe, docs/joint.md). Before every layer has
        an estimate, the margin too."""
        saliency = getattr(self, "saliency", None)
        if getattr(self.config, "landing_order", "margin") != "fisher" or saliency is None or self.frozen:
            return False
        return all("width_fisher" in q._buffers and q.fisher.estimate() is not None for _, q in self.layers.values())

    @torch.no_grad()
    def bytes_per_weight(self) -> torch.Tensor:
        """What one kept weight costs in each layer (calibrated bytes): the estimate's slope in the
        layer's count, i.e. its value bits plus its share of the position bits at this density."""
        bits = torch.stack([q.bits_ste().detach().float() for _, q in self.layers.values()])
        counts = torch.tensor([float(q.hard_keep(m.parametrizations.weight.original).sum())
                               for m, q in self.layers.values()], device=bits.device, requires_grad=True)
        numels = [m.parametrizations.weight.original.numel() for m, _ in self.layers.values()]
        with torch.enable_grad():
            (slope,) = torch.autograd.grad(sparse_layer_bytes(counts, numels, bits).sum(), counts)
        return (slope * self.scale).clamp_min(1e-3)

    @torch.no_grad()
    def ranking(self, drop: bool, share: float = CHANNEL_SHARE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gate decisions a projection may change, cheapest first: (layer of each, flat index
        in its layer, bytes it frees or costs). Dropping, a kept weight's price is its margin to
        the dead zone's edge (in steps: how far training kept it from pruning) per byte it frees,
        so weights barely kept in layers where a weight costs most go first, across layers, and
        `channel_floor` protects each channel's strongest weights; with `landing_order: fisher` the
        price and the strength are the weight's Fisher cost instead (`drops_by_fisher`). Reviving:
        the pruned weights nearest the edge, per byte they cost."""
        per_byte = self.bytes_per_weight()
        by_fisher = drop and self.drops_by_fisher()
        scores, owners, where = [], [], []
        for i, (m, q) in enumerate(self.layers.values()):
            w = m.parametrizations.weight.original
            margin = q.edge_distance(w).detach().expand_as(w)
            if by_fisher:  # what the weight is worth to the loss (OBD), not its distance to the edge
                margin = self.saliency.cost(q, w.detach())
            keep = q.hard_keep(w)
            eligible = keep & ~channel_floor(keep, margin, share=share) if drop else ~keep
            idx = torch.nonzero(eligible.flatten()).flatten()
            m_idx = margin.flatten()[idx].float()
            scores.append(m_idx / per_byte[i] if drop else -m_idx * per_byte[i])
            owners.append(torch.full((len(idx),), i, device=idx.device))
            where.append(idx)
        order = torch.argsort(torch.cat(scores), stable=True)
        owners = torch.cat(owners)[order]
        return owners, torch.cat(where)[order], per_byte[owners]

    def warn_late(self, step: int, now: float, aim: float) -> None:
        """Say once that the dead zones ended the decision window far over the aim, and what holds them."""
        saliency = getattr(self.config, "saliency", 0.0)
        pulls = saliency > 0 and getattr(self.config, "saliency_mode", "price") != "landing"
        fix = (f"The Fisher price of each pruned weight (size_budget.saliency: {saliency:g}) held the dead zones back: "
               "set size_budget.saliency_mode: landing (the estimate then only orders the landing's cuts; on a small "
               "ViT with 2,000 images it landed on time, docs/joint.md), or give the decisions more steps (more epochs)"
               if pulls else "The dead zones moved too slowly: give the decisions more steps (more epochs)")
        warnings.warn(
            f"size_budget: at step {step}, after its decision window, the weights file is {now / aim - 1:.0%} over "
            f"the aim ({now:,.0f} B against {aim:,.0f} B); the excess is cut in steps before the freeze at step "
            f"{self.freeze_step}, and a cut this large this late can cost accuracy. {fix}", stacklevel=2)

    @torch.no_grad()
    def catch_up(self, step: int) -> None:
        """Between the window's end and the freeze the goal is final, but in a short run the LR has
        decayed by then and the dead zones move too slowly to reach it (LeNet-5 at 400x on 2,000
        images: 53% over at the freeze, and the one-shot projection fell to chance). If the state
        is still more than CATCH_UP_TOLERANCE over the aim, drop the cheapest share of the excess
        now, spread evenly over the checks left, so training recovers between the cuts and the
        freeze's projection has little left to do. A state on its aim is never touched. With
        size_budget.lag_tolerance, the checks inside the window cut a lagging state too (`track`)."""
        tolerance = getattr(self.config, "lag_tolerance", None)
        if tolerance is not None and self.window[0] < step < self.window[1]:
            self.track(step, tolerance)
            return
        if not self.window[1] <= step < self.freeze_step:
            return
        aim, now = self.aim(), self.calibrated_hard()
        if now <= aim * (1 + CATCH_UP_TOLERANCE):
            return
        late = max(LATE_EXCESS, (tolerance or 0.0) + CATCH_UP_TOLERANCE)  # a lag the recipe allows is not news
        if not self.late_checked and now > aim * (1 + late):  # judged at the first catch-up, once per run
            self.warn_late(step, now, aim)
        self.late_checked = True
        every = self.calibration_interval
        count = self._cut(every / (self.freeze_step - step + every) * (now - aim))
        self.events.append({"event": "size_catch_up", "step": step, "bytes_before": round(now),
                            "aim_bytes": round(aim), "dropped_weights": count, "kept": self.kept_by_layer()})

    @torch.no_grad()
    def track(self, step: int, tolerance: float) -> None:
        """Inside the decision window (size_budget.lag_tolerance): a state more than `tolerance` over the
        budget's goal now is cut back toward that bound (as far as the estimate counts the bytes a weight
        frees; the next check cuts again), cheapest first (`ranking`), so the excess does not pile up.

        Why: with Adam each dead zone moves about its learning rate a step whatever the size term's price,
        so the bytes fall only as fast as the dead zones that widen allow. Where the Fisher price holds many
        of them shut (the small ViT with 2,000 images) the state stayed 1.7-2 times its goal from a third
        of the window on and ended it 67-73% over the aim; the catch-up then cut that in the last steps
        before the freeze. Cut as it builds up, the excess goes in small steps at the window's learning
        rate (docs/joint.md, "Cutting the lag as it builds up": most of the ViT's loss, not all of it)."""
        bound, now = self.goal(step) * (1 + tolerance), self.calibrated_hard()
        if now <= bound:
            return
        count = self._cut(now - bound)
        self.events.append({"event": "size_track_cut", "step": step, "bytes_before": round(now),
                            "bound_bytes": round(bound), "dropped_weights": count, "kept": self.kept_by_layer()})

    @torch.no_grad()
    def _cut(self, excess: float) -> int:
        """Zero the cheapest kept weights (`ranking`) until the estimate frees `excess` bytes: into the
        dead zone, where training may grow them back; the pattern stays free. Returns how many."""
        owners, where, freed = self.ranking(drop=True)
        count = _first_reaching(freed, excess) + 1
        for i, (m, _) in enumerate(self.layers.values()):
            set_flat(m.parametrizations.weight.original, where[:count][owners[:count] == i], 0.0)
        self.moved_weights = True
        return count


def _first_reaching(costs: torch.Tensor, total: float) -> int:
    """How many of `costs`, taken in order, it takes before their running sum reaches `total`
    (searchsorted on the cumulative sum, on the costs' device)."""
    running = torch.cumsum(costs, 0)
    return int(torch.searchsorted(running, torch.tensor(total, device=running.device)))

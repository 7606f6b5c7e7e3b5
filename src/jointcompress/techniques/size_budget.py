"""The artifact's size as a constraint inside training, met by a Lagrange multiplier.

Why: without it, the only conflict a joint run has is between task and distillation, which
rarely disagree; the real trade-off of compression (accuracy vs bytes) is decided outside
training, by an allocator that guesses how trained weights will encode. Here the bytes are a
differentiable function of what training learns: per layer, the kept weights (the dead
zones of `zero_level.ZeroLevelLSQWeight`) times the bits of their value and of their sparse
position, plus the fixed parts (scales, biases, container). The constraint is an augmented
Lagrangian (CoFi / FLOP): term = lam * c + penalty / 2 * c^2 with c = bytes / budget - 1,
lam updated by dual ascent after every step, so the accuracy terms and the size term really
pull against each other on the same weights, steps, dead zones and bit-widths.

Exactness: the estimate uses the hard count of kept weights as its value (a sigmoid surrogate
only for the gradient), and every `calibrate_every` steps the current state is finalized on a
copy and encoded by the artifact writer itself; the estimate's variable part is then scaled
by (real values + indices) / estimate and the fixed part is the measured rest of the file.
The budget warms up (log-linearly) from the size at `start` to the target at `end`; at
`freeze` the zero pattern and widths are fixed and the rest of the run fine-tunes values and
steps.

Landing: in a short run the multiplier cannot get the state to the goal by itself (with Adam
a larger multiplier changes the direction of the dead zones' steps, not their length, and by
the window's end the LR has decayed), so between `end` and `freeze` a state still over the aim
is cut in even steps (`catch_up`), with training in between. At the freeze, what is left
is projected onto the aim (FLOP/CoFi's export rule, `project`): weights barely kept per byte
they free go first, across layers, every channel keeps its strongest weights (a projection
thins a path, it never cuts one), and the count is searched with the writer itself.
`history.events` records the catch-up cuts, how far off the state was at the freeze
(`size_freeze`) and the projection.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .base import RunContext, Technique
from .saliency import FisherSaliency
from .zero_level import ZeroLevelLSQWeight

INDEX_WIDTHS = tuple(range(2, 9))
LAMBDA_MAX = 1e3
DECISION_TRAVEL = 6.0  # how far (in raw units) a dead zone or bit-width can move over the budget's window
LAMBDA_TRAVEL = 50.0  # lambda_lr by default: the multiplier can rise this far over the budget's window
PROJECTION_SLACK = 0.003  # the projection lands within 0.3% of the aim (fine-tuning moves the coding ~0.5%)
# a projection never cuts a path: every output channel that keeps weights keeps at least its strongest
# CHANNEL_FLOOR of them, and at least CHANNEL_SHARE of what it kept before (it thins, it never empties)
CHANNEL_FLOOR = 1
CHANNEL_SHARE = 0.5
MAX_PROBES = 24  # measurements of the weights file one projection may take
# between the window's end and the freeze, a state more than CATCH_UP_TOLERANCE over the aim is
# brought down in steps (the multiplier alone could not get there while the LR decays)
CATCH_UP_TOLERANCE = 0.02


def sparse_layer_bytes(nonzero: torch.Tensor, numel, bits: torch.Tensor) -> torch.Tensor:
    """Values + positions of one layer in the cheapest format the artifact writer offers.

    dense: numel * bits; bitmask: nonzero * bits + numel; relative indices of width w:
    (nonzero + fillers) * (bits + w), a filler for every gap of 2^w zeros or more, with gaps
    as between randomly placed weights at this density. The value is the cheapest format's;
    the gradient is the cheapest *sparse* format's, so a layer still stored dense (whose bytes do
    not depend on how many weights it keeps) feels what each kept weight will cost once it is
    sparse -- with the dense format's zero gradient, dense layers never started to prune.

    Vectorized: `nonzero`, `numel` and `bits` may be 1-D (one entry per layer, one result per
    layer), and every index width is one column, so the whole estimate is a handful of ops.
    """
    n = nonzero.clamp(min=1.0)
    numel = torch.as_tensor(numel, dtype=n.dtype, device=n.device)
    density = (n / numel).clamp(max=1.0 - 1e-6)
    widths = torch.tensor(INDEX_WIDTHS, dtype=n.dtype, device=n.device)
    r = (1 - density).unsqueeze(-1) ** (2 ** widths)
    fillers = n.unsqueeze(-1) * r / (1 - r).clamp_min(1e-12)
    indexed = (n.unsqueeze(-1) + fillers) * (bits.unsqueeze(-1) + widths)
    dense = (numel * bits).unsqueeze(-1)
    bitmask = (n * bits + numel).unsqueeze(-1)
    costs = torch.cat([dense, bitmask, indexed], -1)
    sparse = costs[..., 1:].amin(-1)
    return (sparse + (costs.amin(-1) - sparse).detach()) / 8


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


def measured_bytes(model: nn.Module) -> dict[str, int]:
    """The weights file the artifact writer would produce for the model as it is now."""
    from ..artifact.encode import encode_model
    from ..artifact.store import file_blob
    from ..finalize import finalize
    from ..model_copy import plain_copy

    plain = plain_copy(model)
    spec = finalize(plain)
    enc = encode_model(plain, spec)
    totals = enc.totals()
    total = len(file_blob(enc))
    return {"total": total, "variable": totals["values"] + totals["indices"]}


class SizeBudget(Technique):
    kind = "size_budget"
    order = 30  # after quant_lsq, whose quantizers it reads

    def __init__(self, config):
        super().__init__(config)
        self.layers: dict[str, tuple[nn.Module, ZeroLevelLSQWeight]] = {}
        self.lam = 0.0
        self.scale = 1.0  # real variable bytes / estimated
        self.fixed = 0.0  # bytes that do not depend on training (scales, biases, container)
        self.start_bytes = 0.0
        self.last_hard = 0.0
        self.calibrations = 0
        self.events: list[dict] = []
        self.model: nn.Module | None = None
        self.span = 1
        self.frozen_at = 0  # the step of the freeze
        self.freeze_step = 0  # when it is due (set in setup)
        self.calibration_interval = 1
        self.trimmed = False  # with finetune_phase: the half-way re-projection has run
        # OBD's curvature cost of a pruned weight on the dead zones (saliency.py); off at 0
        self.saliency = FisherSaliency(config.saliency) if getattr(config, "saliency", 0.0) > 0 else None

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        self.layers = {
            name: (m, p) for name, m in ctx.model.named_modules() if hasattr(m, "parametrizations")
            and "weight" in m.parametrizations for p in m.parametrizations.weight if isinstance(p, ZeroLevelLSQWeight)
        }
        if not self.layers:
            from ..errors import RecipeError

            raise RecipeError("size_budget found no quantizer with a dead zone; set quant_lsq.zero_level: true "
                              "and start quant_lsq no later than size_budget")
        if self.config.target_bytes is None:
            from ..errors import RecipeError

            raise RecipeError("size_budget.target_bytes is not set; give the recipe a target (size_kb or ratio)")
        self.model = ctx.model
        # the steps over which the dead zones and the multiplier must travel (a tenth of the run at least)
        self.span = max(1, self.window[1] - self.window[0], ctx.total_steps // 10)
        self.calibration_interval = self.config.calibrate_every or max(1, ctx.total_steps // 40)
        # the step of the freeze, as plan.joint_plan sets it
        self.freeze_step = max(self.window[1], min(ctx.total_steps - 1, round(self.config.freeze * ctx.total_steps)))
        for _, q in self.layers.values():  # Adam moves a parameter ~lr a step: let the dead zones cross the window
            q.decision_lr = DECISION_TRAVEL / self.span
        self.calibrate(ctx.model)
        self.start_bytes = self.calibrated_hard()
        self.attached = True

    def goal(self, step: int) -> float:
        """The budget now: log-linear from the size at `start` to the target at `end` (with
        `schedule: cubic`, the log-size moves as 1 - (1 - p)^3: the last part of the window
        changes little, so the multiplier catches up before the freeze)."""
        final = self.config.target_bytes * (1 - self.config.margin)
        a, b = self.window
        if step >= b or b <= a:
            return final
        p = max(0.0, (step - a) / (b - a))
        if getattr(self.config, "schedule", "log_linear") == "cubic":  # fast first, slow at the end (Zhu & Gupta)
            p = 1 - (1 - p) ** 3
        start = max(self.start_bytes, final)
        return math.exp((1 - p) * math.log(start) + p * math.log(final))

    def on_step(self, ctx: RunContext) -> None:
        if not self.frozen and ctx.step > self.window[0] and ctx.step % self.calibration_interval == 0:
            self.calibrate(ctx.model)
            self.catch_up(ctx.step)
        if not self.frozen:
            self.frozen_at = ctx.step  # the freeze event calls on_step at its step, then freeze()
        elif getattr(self.config, "finetune_phase", False) and ctx.step == self.trim_step(ctx.total_steps):
            self.trim(ctx.model)

    def trim_step(self, total_steps: int) -> int:
        """Half-way through the fine-tuning after the freeze (with `finetune_phase`)."""
        return self.frozen_at + max(1, (total_steps - self.frozen_at) // 2)

    def trim(self, model: nn.Module) -> None:
        """Fine-tuning at the full rate moves the kept values over the levels, and their
        entropy-coded bytes move with them (+4% on LeNet-300-100 at 100x): flip the cheapest
        gate decisions (`ranking`) until the file is back on the aim; the second
        half of the fine-tuning recovers from it (the sequential pipeline's late trim does the same)."""
        self.land(model, event="size_trim")
        self.trimmed = True

    def land(self, model: nn.Module | None, event: str = "size_projection") -> None:
        """Project onto the aim (see `project`), with the real encoder as the judge."""
        model = model if model is not None else self.model
        if model is not None:
            self.calibrate(model)
            self.project(model, event=event)

    def loss_terms(self, ctx: RunContext) -> dict[str, torch.Tensor]:
        if self.frozen:
            return {}
        est = self.estimate(soft=True)
        goal = self.goal(ctx.step)
        c = est / goal - 1
        self.last_hard = float(est.detach())
        if self.saliency is not None:
            self.saliency.watch(self.layers)
        return {"size": self.lam * c + 0.5 * self.config.penalty * c * c}

    def before_optimizer_step(self, ctx: RunContext) -> None:
        """Learned widths: their rounding noise's price (zero_level.width_step). With `saliency`:
        weigh each dead zone's size price against the Fisher cost of what it prunes."""
        if self.frozen:
            return
        batch = ctx.batch_targets if ctx.batch_targets is not None else ctx.batch_inputs
        batch_size = len(batch) if batch is not None and hasattr(batch, "__len__") else 1
        for m, q in self.layers.values():
            q.width_step(m.parametrizations.weight.original.detach(), batch_size)
        if self.saliency is None:
            return
        self.saliency.accumulate(batch_size)
        self.saliency.add_gradient(self.layers)

    def after_optimizer_step(self, ctx: RunContext) -> None:
        if self.frozen:
            return
        c = self.last_hard / self.goal(ctx.step) - 1
        lr = self.config.lambda_lr or LAMBDA_TRAVEL / self.span
        self.lam = max(-LAMBDA_MAX, min(LAMBDA_MAX, self.lam + lr * c))

    def freeze(self) -> None:
        """Fix the zero pattern and widths, first projected onto the target (see `project`); the
        history records how far off the trained state was (what the projection had to do)."""
        if self.model is not None:
            self.calibrate(self.model)
            now, aim = self.calibrated_hard(), self.aim()
            self.events.append({"event": "size_freeze", "step": self.frozen_at, "bytes_at_freeze": round(now),
                                "aim_bytes": round(aim), "off_by": round(now / aim - 1, 4), "lambda": round(self.lam, 4)})
            self.project(self.model)
        for name, (m, q) in self.layers.items():
            q.fix_pattern(m.parametrizations.weight.original.detach())
        super().freeze()

    # -- the estimate ----------------------------------------------------------------------
    def estimate(self, soft: bool = True) -> torch.Tensor:
        """Bytes of the weights file as training stands: calibrated variable part + fixed part."""
        return self.scale * self.layer_bytes(soft).sum() + self.fixed

    def layer_bytes(self, soft: bool = True) -> torch.Tensor:
        """Estimated values + positions of every layer (uncalibrated), one entry per layer. The
        kept-weight counts come from the last forward pass when it is current (kept_count)."""
        counts, numels, bits = [], [], []
        for m, q in self.layers.values():
            w = m.parametrizations.weight.original
            nz = q.kept_count(w)
            counts.append(nz if soft else nz.detach())
            numels.append(w.numel())
            bits.append(q.bits_ste())
        return sparse_layer_bytes(torch.stack(counts), numels, torch.stack(bits))

    def calibrated_hard(self) -> float:
        with torch.no_grad():
            return float(self.estimate(soft=False))

    @torch.no_grad()
    def calibrate(self, model: nn.Module) -> None:
        """Measure the real file and fit the estimate's scale and fixed part to it."""
        real = measured_bytes(model)
        raw = float(self.layer_bytes(soft=False).sum())
        self.scale = real["variable"] / max(raw, 1.0) if real["variable"] > 0 else 1.0
        self.fixed = float(real["total"] - real["variable"])
        self.calibrations += 1

    def aim(self) -> float:
        return self.config.target_bytes * (1 - self.config.margin)

    @torch.no_grad()
    def project(self, model: nn.Module, event: str = "size_projection") -> bool:
        """Land on the aim: drop kept weights while over it (revive pruned ones while under it),
        in the order of `ranking`, taking as many as the weights file needs. The coding is not
        smooth in the count (a layer changes format or index width; the entropy coder), so the
        count is searched with the writer itself (`_search`, a bisection). A channel keeps at
        least CHANNEL_SHARE of what it kept (never less than its strongest weight); only if the
        aim cannot be met that way is the share relaxed to the single strongest weight."""
        aim = self.aim()
        before = self.calibrated_hard()
        if aim * (1 - PROJECTION_SLACK) <= before <= aim * (1 + PROJECTION_SLACK):
            return False
        drop = before > aim
        keeps = [q.hard_keep(m.parametrizations.weight.original) for m, q in self.layers.values()]
        shares = (CHANNEL_SHARE, 0.0) if drop else (0.0,)
        orders = [self.ranking(drop, share) for share in shares]  # before any probe fixes a pattern
        for share, order in zip(shares, orders):
            guess = int(torch.searchsorted(torch.cumsum(order[2], 0), torch.tensor(abs(before - aim))))
            count, probes = self._search(lambda k: self._apply(model, order, k, keeps, drop), len(order[0]), guess, drop)
            if not drop or self._apply(model, order, count, keeps, drop) <= aim * (1 + PROJECTION_SLACK):
                break
        self._apply(model, order, count, keeps, drop)
        self.calibrate(model)
        self.events.append({"event": event, "bytes_before": round(before), "bytes_after": round(self.calibrated_hard()),
                            "aim_bytes": round(aim), "dropped_weights" if drop else "revived_weights": int(count),
                            "channel_share": share, "probes": probes, "target_bytes": round(self.config.target_bytes)})
        return True

    def _search(self, measure, n: int, guess: int, drop: bool) -> tuple[int, int]:
        """The count of decisions that puts the file on the aim: dropping, the fewest whose file
        is not over aim * (1 + slack); reviving, the most. Bisection on `measure(count)` (the
        file's bytes), bracketed from the estimate's `guess`; returns (count, measurements)."""
        aim = self.aim()
        band = (aim * (1 - PROJECTION_SLACK), aim * (1 + PROJECTION_SLACK))
        probes = 0

        def ok(k: int) -> tuple[bool, bool]:  # (not over the band, inside it)
            nonlocal probes
            probes += 1
            size = measure(k)
            return size <= band[1], band[0] <= size <= band[1]

        lo, hi = 0, n  # drop: ok(lo) false, ok(hi) assumed true; revive: ok(lo) true, ok(hi) assumed false
        first = min(n, max(1, 2 * guess))
        fine, hit = ok(first)
        if hit:
            return first, probes
        if fine == drop:
            hi = first
        else:
            lo = first
        while hi - lo > 1 and probes < MAX_PROBES:
            mid = (lo + hi) // 2
            fine, hit = ok(mid)
            if hit:
                return mid, probes
            if fine == drop:
                hi = mid
            else:
                lo = mid
        return (hi if drop else lo), probes

    def _apply(self, model: nn.Module, order, count: int, keeps: list[torch.Tensor], drop: bool) -> float:
        """Fix the pattern `keeps` with the first `count` decisions of `order` flipped; the file's bytes."""
        owners, where = order[0][:count], order[1][:count]
        for i, (m, q) in enumerate(self.layers.values()):
            keep = keeps[i].clone()
            keep.view(-1)[where[owners == i]] = not drop
            q.fix_pattern(m.parametrizations.weight.original.detach(), keep)
        return float(measured_bytes(model)["total"])

    @torch.no_grad()
    def bytes_per_weight(self) -> torch.Tensor:
        """What one kept weight costs in each layer (calibrated bytes): the estimate's slope in the
        layer's count, i.e. its value bits plus its share of the position bits at this density."""
        counts = torch.tensor([float(q.hard_keep(m.parametrizations.weight.original).sum())
                               for m, q in self.layers.values()], requires_grad=True)
        numels = [m.parametrizations.weight.original.numel() for m, _ in self.layers.values()]
        bits = torch.stack([q.bits_ste().detach().float() for _, q in self.layers.values()])
        with torch.enable_grad():
            (slope,) = torch.autograd.grad(sparse_layer_bytes(counts, numels, bits).sum(), counts)
        return (slope * self.scale).clamp_min(1e-3)

    @torch.no_grad()
    def ranking(self, drop: bool, share: float = CHANNEL_SHARE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gate decisions a projection may change, cheapest first: (layer of each, flat index
        in its layer, bytes it frees or costs). Dropping, a kept weight's price is its margin to
        the dead zone's edge (in steps: how far training kept it from pruning) per byte it frees,
        so weights barely kept in layers where a weight costs most go first, across layers, and
        `channel_floor` protects each channel's strongest weights. Reviving: the pruned weights
        nearest the edge, per byte they cost."""
        per_byte = self.bytes_per_weight()
        scores, owners, where = [], [], []
        for i, (m, q) in enumerate(self.layers.values()):
            w = m.parametrizations.weight.original
            margin = q.edge_distance(w).detach().expand_as(w)
            keep = q.hard_keep(w)
            eligible = keep & ~channel_floor(keep, margin, share=share) if drop else ~keep
            idx = torch.nonzero(eligible.flatten()).flatten()
            m_idx = margin.flatten()[idx].float()
            scores.append(m_idx / per_byte[i] if drop else -m_idx * per_byte[i])
            owners.append(torch.full((len(idx),), i))
            where.append(idx)
        order = torch.argsort(torch.cat(scores), stable=True)
        owners = torch.cat(owners)[order]
        return owners, torch.cat(where)[order], per_byte[owners]

    @torch.no_grad()
    def catch_up(self, step: int) -> None:
        """Between the window's end and the freeze the goal is final, but in a short run the LR has
        decayed by then and the dead zones move too slowly to reach it (LeNet-5 at 400x on 2,000
        images: 53% over at the freeze, and the one-shot projection fell to chance). If the state
        is still more than CATCH_UP_TOLERANCE over the aim, drop the cheapest share of the excess
        now, spread evenly over the checks left, so training recovers between the cuts and the
        freeze's projection has little left to do. A state on its aim is never touched."""
        if not self.window[1] <= step < self.freeze_step:
            return
        aim, now = self.aim(), self.calibrated_hard()
        if now <= aim * (1 + CATCH_UP_TOLERANCE):
            return
        every = self.calibration_interval
        share = every / (self.freeze_step - step + every)
        owners, where, freed = self.ranking(drop=True)
        count = int(torch.searchsorted(torch.cumsum(freed, 0), torch.tensor(share * (now - aim)))) + 1
        for i, (m, _) in enumerate(self.layers.values()):  # into the dead zone; the task may grow them back
            m.parametrizations.weight.original.view(-1)[where[:count][owners[:count] == i]] = 0.0
        self.events.append({"event": "size_catch_up", "step": step, "bytes_before": round(now),
                            "aim_bytes": round(aim), "dropped_weights": count})

    def at_target(self) -> bool:
        """Only states after the freeze (pattern and widths fixed at the target) are final; with
        `finetune_phase`, only those after the half-way re-projection (before it, the fine-tuned
        values may have moved the file off the target)."""
        return self.frozen and (self.trimmed or not getattr(self.config, "finetune_phase", False))

    # -- bookkeeping -----------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        return {"size_bytes": self.calibrated_hard() if self.layers else 0.0, "size_lambda": self.lam,
                "size_scale": self.scale, "size_calibrations": float(self.calibrations)}

    def state_dict(self):
        extra = self.saliency.state_dict() if self.saliency is not None else {}
        return {**extra, "lam": torch.tensor(self.lam, dtype=torch.float64), "scale": torch.tensor(self.scale, dtype=torch.float64),
                "fixed": torch.tensor(self.fixed, dtype=torch.float64),
                "start_bytes": torch.tensor(self.start_bytes, dtype=torch.float64),
                "frozen_at": torch.tensor(self.frozen_at), "trimmed": torch.tensor(self.trimmed)}

    def load_state_dict(self, state):
        self.lam, self.scale = float(state["lam"]), float(state["scale"])
        self.fixed, self.start_bytes = float(state["fixed"]), float(state["start_bytes"])
        self.frozen_at = int(state.get("frozen_at", torch.tensor(0)))
        self.trimmed = bool(state.get("trimmed", torch.tensor(False)))
        if self.saliency is not None:
            self.saliency.load_state_dict(state)

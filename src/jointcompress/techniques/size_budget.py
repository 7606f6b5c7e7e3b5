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
(`size_freeze`) and the projection, each with every layer's kept weights (`kept`).
"""
from __future__ import annotations

import math
import time
import warnings

import torch
import torch.nn as nn

from ..model_call import on_model_device
from .base import RunContext, Technique
from .layer_split import ErkSplit
from .saliency import FisherSaliency
from .masks import has_channel_masks
from .size_estimate import (finalized_copy, fixed_bytes_detail, fixed_part_hint, measured_bytes, sparse_layer_bytes,
                            sparse_layer_bytes_with_slopes)
from .size_projection import Landing
from .zero_level import ZeroLevelLSQWeight
LAMBDA_MAX = 1e3
DECISION_TRAVEL = 6.0  # how far (in raw units) a dead zone or bit-width can move over the budget's window
LAMBDA_TRAVEL = 50.0  # lambda_lr by default: the multiplier can rise this far over the budget's window
WINDUP_DECAY = 10.0  # with anti_windup: a positive multiplier e-folds this many times a window while under the budget
FIXED_SHARE_WARNING = 0.5  # before training, said where the bytes no decision moves take this share of the aim
OVERSHOOT_WARNING = 0.05  # a state this far under its aim at the freeze is said (warn_overshoot)
CALIBRATION_WARN_SECONDS = 5.0  # one measurement of the file slower than this is said, with the run's count
GUARDS = 8  # with finetune_phase: checks of the real file over the fine-tuning's second half (after the trim)


def _batch_size(ctx: RunContext) -> int:
    """The samples of the batch session.loss saw last (its targets, else its inputs; 1 if neither has a length)."""
    batch = ctx.batch_targets if ctx.batch_targets is not None else ctx.batch_inputs
    return len(batch) if batch is not None and hasattr(batch, "__len__") else 1


class SizeBudget(Landing, Technique):
    kind = "size_budget"
    order = 30  # after quant_lsq, whose quantizers it reads

    def __init__(self, config):
        super().__init__(config)
        self.layers: dict[str, tuple[nn.Module, ZeroLevelLSQWeight]] = {}
        self.lam = 0.0
        self.never_binds = False  # the model met the target before any decision, at fixed widths (note_slack)
        self.scale = 1.0  # real variable bytes / estimated
        self.fixed = 0.0  # bytes that do not depend on training (scales, biases, container)
        self.start_bytes = 0.0
        self.last_hard = 0.0
        self.last_size_bytes = 0.0  # metrics' last estimate (what it reports after finalize)
        self.calibrations = 0
        self.events: list[dict] = []
        self.model: nn.Module | None = None
        self.span = 1
        self.frozen_at = 0  # the step of the freeze
        self.freeze_step = 0  # when it is due (set in setup)
        self.calibration_interval = 1
        self.trimmed = False  # with finetune_phase: the half-way re-projection has run
        self.late_checked = False  # the first catch-up has judged the lag (warn_late); a checkpoint keeps it
        self.split: ErkSplit | None = None  # layer_split: erk (set in setup)
        self.last_errors: list[float] = []  # the per-layer bounds' errors of the last size term (split's dual ascent)
        # OBD's curvature cost of a pruned weight on the dead zones (saliency.py); off at 0
        self.saliency = (FisherSaliency(config.saliency, getattr(config, "saliency_mode", "price"))
                         if getattr(config, "saliency", 0.0) > 0 else None)

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        from ..block_drop import inside_faded

        dropped = inside_faded(ctx.model)  # prune_blocks' blocks: not in the file, so not in the budget
        self.layers = self._dead_zone_layers(ctx.model, dropped)
        if not self.layers:
            from ..errors import RecipeError

            raise RecipeError("size_budget found no quantizer with a dead zone; set quant_lsq.zero_level: true "
                              "and start quant_lsq no later than size_budget")
        if self.config.target_bytes is None:
            from ..errors import RecipeError

            raise RecipeError("size_budget.target_bytes is not set; give the recipe a target (size_kb or ratio)")
        self.model = ctx.model
        self.example_inputs = ctx.example_inputs  # the file measured with prune_structured's channels removed
        # the steps over which the dead zones and the multiplier must travel (a tenth of the run at least)
        self.span = max(1, self.window[1] - self.window[0], ctx.total_steps // 10)
        self.calibration_interval = self.config.calibrate_every or max(1, ctx.total_steps // 40)
        self.freeze_step = self.config.freeze_step(self.window[1], ctx.total_steps)  # as plan.joint_plan sets it
        if getattr(self.config, "layer_split", "learned") == "erk":
            self.split = ErkSplit([m.parametrizations.weight.original.shape for m, _ in self.layers.values()],
                                  self.config.layer_band)
        for _, q in self.layers.values():  # Adam moves a parameter ~lr a step: let the dead zones cross the window
            q.decision_lr = DECISION_TRAVEL / self.span
        if self.saliency is not None:  # the quantizers keep the Fisher estimate it reads
            self.saliency.attach(self.layers)
        started = time.perf_counter()
        self.calibrate(ctx.model)
        self.warn_calibration_cost(time.perf_counter() - started)
        if not has_channel_masks(ctx.model):  # all three assume every channel stays (before_training counted them without)
            self.check_reachable(ctx.model)
            if not self.warn_channel_floor():  # the stronger word where both apply
                self.warn_fixed_share(ctx.model)
        self.start_bytes = self.calibrated_hard()
        self.note_slack()
        self.attached = True

    def warn_calibration_cost(self, seconds: float) -> None:
        """Each calibration finalizes a copy of the model and encodes the whole file, as save() does:
        some 40 a run however long it is (every step under 40 steps), plus the landing's probes. On a
        large model that is minutes a run (27 CPU-s each on BERT-base, benchmarks/measure_cost.py),
        which no step time shows; said once, with the count and the knob, when one took
        over CALIBRATION_WARN_SECONDS (the measurement is the only input: the run is not changed)."""
        if seconds < CALIBRATION_WARN_SECONDS:
            return
        from .size_projection import MAX_PROBES

        window = max(1, self.window[1] - self.window[0])
        count = 1 + window // self.calibration_interval
        warnings.warn(f"size_budget: one measurement of the file (a finalized copy, encoded as save() does) took "
                      f"{seconds:.0f} s, and this run makes about {count} before its landing ({count * seconds / 60:.0f} "
                      f"min) plus up to {MAX_PROBES} per landing; size_budget.calibrate_every (now "
                      f"{self.calibration_interval} steps) makes them rarer", stacklevel=3)

    @staticmethod
    def _dead_zone_layers(model: nn.Module, dropped=()) -> dict:
        return {name: (m, p) for name, m in model.named_modules() if hasattr(m, "parametrizations")
                and "weight" in m.parametrizations and name not in dropped
                for p in m.parametrizations.weight if isinstance(p, ZeroLevelLSQWeight)}

    def before_training(self, ctx: RunContext, techniques: list[Technique]) -> None:
        """Beside prune_structured, the bytes no decision moves are those left once its channels are gone:
        setup cannot count them (it sees every channel, so it waits for them), and a target under them
        would train the whole run to miss it. Counted here, before the first step, on a copy shrunk to
        the widths the run ends with; where those widths are learned (scope: global), to the fewest
        channels each group may keep, a floor: only a target under it is refused."""
        channels = next((t for t in techniques if t.kind == "prune_structured"), None)
        quant = next((t for t in techniques if t.kind == "quant_lsq"), None)
        if channels is None or quant is None or not channels.attached:
            return
        from dataclasses import replace

        from . import build

        with channels.at_end():
            shrunk, _ = finalized_copy(ctx.model, ctx.example_inputs)
        with on_model_device(shrunk):  # its quantizers beside the copy's weights, on a GPU too
            build(quant.config).setup(replace(ctx, model=shrunk))
        probe = type(self)(self.config)  # this budget on the shrunk copy: its bytes, its channel floor
        probe.model, probe.layers = shrunk, self._dead_zone_layers(shrunk)
        probe.calibrate(shrunk)
        gone = (f"once the channels prune_structured removes (sparsity {channels.config.sparsity:g}) are gone"
                if channels.counts_known()
                else "once every channel group of prune_structured is at its fewest (min_keep)")
        probe.check_reachable(shrunk, channels=gone)
        if not probe.warn_channel_floor(channels=gone):
            probe.warn_fixed_share(shrunk, channels=gone)

    def check_reachable(self, model: nn.Module, channels: str | None = None) -> None:
        """Refuse, before training, a target under the bytes that no decision of the run can move
        (step sizes, biases, tensors no technique compresses such as BatchNorm or embeddings):
        the budget would strip every weight and still miss it. `channels`: `model` is the copy
        without the channels prune_structured removes, as the words say (before_training)."""
        if self.config.target_bytes is None or self.fixed < self.aim():
            return
        from ..targets import TargetError

        example = getattr(self, "example_inputs", None) if channels is None else None
        gone = "" if channels is None else f" {channels}"
        raise TargetError(
            f"target: {self.config.target_bytes:,.0f} B cannot be reached: {self.fixed:,.0f} B of the weights file{gone} "
            f"do not depend on what the run decides ({fixed_bytes_detail(model, example_inputs=example)}). "
            "Raise target.size_kb (or lower target.ratio) well above that"
            f"{'' if channels is None else ', or raise prune_structured.sparsity'}: quant_lsq compresses only the "
            "Linear and convolution weights (and with `embeddings: true` the embedding tables) its targets select, "
            "everything else is stored as it is" + fixed_part_hint(model))

    def warn_fixed_share(self, model: nn.Module, channels: str | None = None) -> None:
        """Before training, a target the bytes no decision moves take most of (step sizes, biases,
        normalization layers, tensors no technique compresses): reachable, but the weights get only what
        is left, and on a small model at an aggressive ratio its accuracy fell without a word on why."""
        target = self.config.target_bytes
        if target is None or self.fixed < FIXED_SHARE_WARNING * self.aim():
            return
        example = getattr(self, "example_inputs", None) if channels is None else None
        gone = "" if channels is None else f" {channels}"
        warnings.warn(
            f"size_budget: {self.fixed:,.0f} B of the {target:,.0f} B target ({self.fixed / target:.0%}) do not depend on "
            f"what the run decides{gone} ({fixed_bytes_detail(model, example_inputs=example)}); the weights share the "
            f"{max(self.aim() - self.fixed, 0.0):,.0f} B left, so few of them stay and accuracy may suffer. A larger "
            "target leaves them more" + self._steps_hint() + fixed_part_hint(model), stacklevel=2)

    def _steps_hint(self) -> str:
        """What the step sizes' own bytes could give back: one byte each (log8) where they are fp16, one per
        layer (per_channel: false) where they are per channel. Each part is said only where it applies:
        the per-layer part was once dropped whenever the steps were already log8."""
        quantizers = [q for _, q in self.layers.values()]
        steps = sum(m.parametrizations.weight.original.shape[0] if q.per_channel else 1 for m, q in self.layers.values())
        parts = []
        if any(q.step_format == "fp16" for q in quantizers):
            parts.append(f"quant_lsq.scale_format: log8 stores each of the {steps:,} step sizes in 1 byte instead of 2")
        if any(q.per_channel for q in quantizers):
            parts.append("quant_lsq.per_channel: false stores one step per layer")
        return "; " + ", and ".join(parts) if parts else ""

    def channel_floor_bytes(self) -> float:
        """About the smallest file the landing reaches unless training empties whole channels: every
        output channel keeps its strongest weight (size_projection.channel_floor), each layer at the
        narrowest width it may take; plus the bytes no decision moves."""
        layers = list(self.layers.values())
        counts = torch.tensor([float(m.parametrizations.weight.original.shape[0]) for m, _ in layers])
        numels = [m.parametrizations.weight.original.numel() for m, _ in layers]
        bits = torch.tensor([float(q.min_bits if q.learns_width() else int(q.held_bits)) for _, q in layers])
        with torch.no_grad():
            return self.scale * float(sparse_layer_bytes(counts, numels, bits).sum()) + self.fixed

    def warn_channel_floor(self, channels: str | None = None) -> bool:
        """Before training, a target under `channel_floor_bytes`: reachable only if the run happens to
        empty whole channels, so it will most likely end over the target (said again at the freeze).
        `channels`: measured without the channels prune_structured removes, as the words say. Whether it warned."""
        floor = self.channel_floor_bytes()
        if self.config.target_bytes is None or self.aim() >= floor:
            return False
        gone = "" if channels is None else f" {channels}"
        if self.config.target_bytes >= floor:  # only the margin under the target is below the floor
            warnings.warn(
                f"size_budget: the run aims at {self.aim():,.0f} B (the {self.config.target_bytes:,.0f} B target less "
                f"size_budget.margin), under about {floor:,.0f} B, the file with one weight kept in every output "
                f"channel{gone}: to land there training empties whole channels, or whole layers. Raise target.size_kb "
                "(or lower target.ratio), or lower size_budget.margin" + fixed_part_hint(self.model), stacklevel=2)
            return True
        warnings.warn(
            f"size_budget: the {self.config.target_bytes:,.0f} B target is under about {floor:,.0f} B, the file with "
            f"one weight kept in every output channel{gone} ({self.fixed:,.0f} B of it do not depend on the run's "
            "decisions); the landing never empties a channel, so unless training does, the file will end over the "
            "target. Raise target.size_kb (or lower target.ratio)"
            f"{'' if channels is None else ', or raise prune_structured.sparsity'}" + fixed_part_hint(self.model),
            stacklevel=2)
        return True

    def note_slack(self) -> None:
        """A target the model already meets before any decision: learned widths can spend the
        slack on precision, fixed widths cannot, so the file would end far under the target with
        nothing pruned (4-bit weights alone are an eighth of fp32). Said once, with the fix."""
        if self.start_bytes > self.aim():
            return
        learns = any(q.learns_width() for _, q in self.layers.values())
        self.events.append({"event": "size_budget_slack", "start_bytes": round(self.start_bytes),
                            "target_bytes": round(self.config.target_bytes), "learns_widths": learns})
        # at fixed widths the bytes only fall from here: the budget never binds, and a multiplier let below zero (to
        # give back pruned weights) had none to give and wound down to -25, its term 6x the task's on a probe's LM
        self.never_binds = not learns
        if not learns:
            channels = has_channel_masks(self.model)
            warnings.warn(
                f"size_budget: the model at its fixed bit-widths{' with the channels prune_structured removes' if channels else ''} "
                f"is already {self.start_bytes:,.0f} B before any unstructured pruning, under the "
                f"{self.config.target_bytes:,.0f} B target: nothing needs pruning and the file will end under the target. "
                "To spend the budget on precision, raise quant_lsq.bits or learn the widths (quant_lsq.learn_bits: true "
                "with size_budget written in the recipe: the bare mode: joint form keeps them fixed)"
                f"{', or lower prune_structured.sparsity' if channels else ''}; for a smaller file, lower target.size_kb "
                "(or raise target.ratio)", stacklevel=2)

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
        elif self.trimmed and ctx.step in self.guard_steps(ctx.total_steps):
            self.guard(ctx.model)

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

    def guard_steps(self, total_steps: int) -> set[int]:
        """GUARDS - 1 evenly spaced steps after the trim, and the run's last step."""
        trim = self.trim_step(total_steps)
        left = total_steps - trim
        return {trim + j * left // GUARDS for j in range(1, GUARDS)} - {trim} | {total_steps - 1}

    def guard(self, model: nn.Module) -> None:
        """The values keep moving after the trim, and their entropy-coded bytes with them (+3% over
        the second half of 20 epochs of LeNet-300-100 at 100x, which ended 1.9% over its target):
        a file found over the target is landed on the aim again. A file at or under the target is
        never touched, so a run that stays under it trains exactly as without the guard."""
        if model is not None and self.file_over_target(model):
            self.land(model, event="size_guard")

    def file_over_target(self, model: nn.Module) -> bool:
        """The weights file the writer would produce now is larger than the target."""
        return self.file_bytes(model)["total"] > self.config.target_bytes

    def land(self, model: nn.Module | None, event: str = "size_projection") -> None:
        """Project onto the aim (see `project`), with the real encoder as the judge."""
        model = model if model is not None else self.model
        if model is not None:
            self.calibrate(model)
            self.project(model, event=event)
            self.moved_weights = True

    def loss_terms(self, ctx: RunContext) -> dict[str, torch.Tensor]:
        """lam * c + penalty / 2 * c^2 with c = estimate / goal - 1: the estimate's value and its
        gradient (to the kept-weight counts and the relaxed widths) in closed form, one autograd
        node (SizeTerm); `estimate()` is the same number to float rounding."""
        if self.frozen:
            return {}
        if torch.is_grad_enabled():  # a training micro-batch: its gradient joins the step's Fisher estimate
            samples = _batch_size(ctx)
            for _, q in self.layers.values():
                if "width_fisher" in q._buffers:
                    q.fisher.join(samples)
        counts = torch.stack([q.kept_count(m.parametrizations.weight.original) for m, q in self.layers.values()])
        raw, held, _, span = self._width_vectors()
        numels = [m.parametrizations.weight.original.numel() for m, _ in self.layers.values()]
        loss, est, errors = SizeTerm.apply(counts, raw, held, span, numels, self.scale, self.fixed, self.goal(ctx.step),
                                           self.lam, self.config.penalty, self.split)
        self.last_hard, self.last_errors = float(est), errors.tolist()
        return {"size": loss}

    def before_optimizer_step(self, ctx: RunContext) -> None:
        """Learned widths: their rounding noise's price (zero_level.width_step). With `saliency`:
        weigh each dead zone's size price against the Fisher cost of what it prunes (saliency_mode:
        price), or only that cost's share that moves pruning between dead zones at constant bytes
        (rank); landing only folds the estimate, which orders the landing's cuts."""
        if self.frozen:
            return
        batch_size = _batch_size(ctx)  # the last micro-batch's: the Fisher estimate adds the earlier ones' own
        for m, q in self.layers.values():  # the weight the forward read: its gate is reused
            if q.width_step(m.parametrizations.weight.original, batch_size, step=ctx.step, loss_scale=ctx.loss_scale):
                self.moved_weights = True  # the step re-fit by this rank's Fisher estimate
        if self.saliency is None:
            return
        self.saliency.accumulate(batch_size, ctx.loss_scale)
        if self.saliency.mode != "landing":  # landing: the estimate only orders the landing's cuts
            self.saliency.add_gradient(self.layers, self._bytes_per_weight() if self.saliency.mode == "rank" else None)

    def rank_local_grads(self) -> list[torch.Tensor]:
        """The learned widths' noise price and the saliency's dead-zone gradient come from each rank's own
        Fisher estimate (its own gradients), added after the averaging."""
        if self.frozen:
            return []
        quantizers = [q for _, q in self.layers.values()]
        params = [q.bits_raw for q in quantizers if q.learns_width()]
        if self.saliency is not None and self.saliency.mode != "landing":
            params += [q.dead_zone_raw for q in quantizers if q.dead_zone_raw.requires_grad]
        return params

    def after_optimizer_step(self, ctx: RunContext) -> None:
        if self.frozen:
            return
        c = self.last_hard / self.goal(ctx.step) - 1
        lr = self.config.lambda_lr or LAMBDA_TRAVEL / self.span
        if self.config.anti_windup and c < 0 < self.lam:
            # the multiplier integrates the descent's error and keeps pushing once the state is under
            # the budget (it ends ~2% under the aim, and the freeze revives weights with stale values)
            self.lam *= 1 - WINDUP_DECAY / self.span
        self.lam = max(0.0 if self.never_binds else -LAMBDA_MAX, min(LAMBDA_MAX, self.lam + lr * c))
        if self.split is not None:
            self.split.ascend(self.last_errors, lr, LAMBDA_MAX)

    def freeze(self) -> None:
        """Fix the zero pattern and widths, first projected onto the target (see `project`); the
        history records how far off the trained state was (what the projection had to do)."""
        if self.model is not None:
            self.calibrate(self.model)
            now, aim = self.calibrated_hard(), self.aim()
            self.events.append({"event": "size_freeze", "step": self.frozen_at, "bytes_at_freeze": round(now),
                                "aim_bytes": round(aim), "off_by": round(now / aim - 1, 4), "lambda": round(self.lam, 4),
                                "kept": self.kept_by_layer()})
            self.warn_overshoot(now / aim - 1)
            self.project(self.model)
            self.warn_missed()
            if not any(e["event"] == "size_budget_slack" for e in self.events):  # said at the start already
                self.warn_under()
        for name, (m, q) in self.layers.items():
            q.fix_pattern(m.parametrizations.weight.original.detach())
        super().freeze()

    def warn_overshoot(self, off_by: float) -> None:
        """The state far under its aim at the freeze, the multiplier still pulling: the projection gives back
        weights whose values drifted while they were pruned (a probe: 344-3,565 of them on users' models, and
        a Conv1d model 26 points under sequential at 60x in 15 epochs). Runs shorter than the decision window
        overshoot most; the multiplier's anti-windup keeps the state on its goal. Said, not changed: the
        stored runs trained without it."""
        if off_by >= -OVERSHOOT_WARNING or self.config.anti_windup or self.lam <= 0:
            return
        schedule = " (or schedule: log_linear)" if getattr(self.config, "schedule", "log_linear") == "cubic" else ""
        warnings.warn(f"size_budget: at the freeze the model was {-100 * off_by:.0f}% under its aim with the size "
                      f"multiplier still at {self.lam:.3g}, so the pattern fixed there gives back weights whose values "
                      f"drifted while pruned, and accuracy may suffer; size_budget.anti_windup: true{schedule} keeps the "
                      "state on its goal, above all in runs shorter than the decision window, and so do more "
                      "training.epochs. (A recipe of mode: joint without a size_budget section gets the joint form's "
                      "own: write out quant_lsq and size_budget as the artifact manifest's recipe has them, then add "
                      "anti_windup; a size_budget section of defaults alone learns widths and drops the joint form's "
                      "grid and landing settings)", stacklevel=3)

    # -- the estimate ----------------------------------------------------------------------
    def estimate(self, soft: bool = True) -> torch.Tensor:
        """Bytes of the weights file as training stands: calibrated variable part + fixed part."""
        return self.scale * self.layer_bytes(soft).sum() + self.fixed

    def layer_bytes(self, soft: bool = True) -> torch.Tensor:
        """Estimated values + positions of every layer (uncalibrated), one entry per layer. The
        kept-weight counts come from the last forward pass when it is current (kept_count)."""
        counts, numels = [], []
        for m, q in self.layers.values():
            w = m.parametrizations.weight.original
            nz = q.kept_count(w)
            counts.append(nz if soft else nz.detach())
            numels.append(w.numel())
        return sparse_layer_bytes(torch.stack(counts), numels, self.layer_bits())

    def layer_bits(self) -> torch.Tensor:
        """Every layer's `bits_ste()` (the held width in value, the relaxed one's gradient) in one
        vector: the same numbers, a handful of operations instead of seven per layer."""
        raw, held, lo, span = self._width_vectors()
        b = lo + span * torch.sigmoid(raw)
        return held + (b - b.detach())

    def _bytes_per_weight(self) -> dict[str, float]:
        """Each layer's bytes per kept weight at its count and width now (the size term's slope)."""
        counts = [float(q.kept_count(m.parametrizations.weight.original).detach()) for m, q in self.layers.values()]
        numels = [m.parametrizations.weight.original.numel() for m, _ in self.layers.values()]
        bits = [float(q.held_bits) for _, q in self.layers.values()]
        return dict(zip(self.layers, sparse_layer_bytes_with_slopes(counts, numels, bits)[1]))

    def _width_vectors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every layer's raw width, held width, min_bits and max_bits - min_bits, as vectors."""
        qs = [q for _, q in self.layers.values()]
        raw = torch.stack([q.bits_raw for q in qs])
        key = tuple((q.min_bits, q.max_bits) for q in qs) + (raw.dtype, raw.device)
        if getattr(self, "_bit_range", (None,))[0] != key:
            lo = torch.tensor([float(q.min_bits) for q in qs], dtype=raw.dtype, device=raw.device)
            span = torch.tensor([float(q.max_bits - q.min_bits) for q in qs], dtype=raw.dtype, device=raw.device)
            self._bit_range = (key, lo, span)
        _, lo, span = self._bit_range
        return raw, torch.stack([q.held_bits for q in qs]).to(raw.dtype), lo, span

    def file_bytes(self, model: nn.Module) -> dict[str, int]:
        """The weights file finalize and save would write now (size_estimate.measured_bytes)."""
        return measured_bytes(model, getattr(self, "example_inputs", None))

    def calibrated_hard(self) -> float:
        with torch.no_grad():
            return float(self.estimate(soft=False))

    @torch.no_grad()
    def calibrate(self, model: nn.Module) -> None:
        """Measure the real file and fit the estimate's scale and fixed part to it."""
        real = self.file_bytes(model)
        raw = float(self.layer_bytes(soft=False).sum())
        self.scale = real["variable"] / max(raw, 1.0) if real["variable"] > 0 else 1.0
        self.fixed = float(real["total"] - real["variable"])
        self.calibrations += 1

    def aim(self) -> float:
        return self.config.target_bytes * (1 - self.config.margin)

    def at_target(self) -> bool:
        """Only states after the freeze (pattern and widths fixed at the target) are final; with
        `finetune_phase`, only those after the half-way re-projection whose file is at or under the
        target (the fine-tuned values move the file; `guard` lands it again, and the loop must not
        keep an epoch from before that)."""
        if not getattr(self.config, "finetune_phase", False):
            return self.frozen
        return self.frozen and self.trimmed and (self.model is None or not self.file_over_target(self.model))

    # -- bookkeeping -----------------------------------------------------------------------
    def before_finalize(self) -> None:
        """The bytes as the model is finalized, what metrics() reports after (a session whose metrics
        were first read after finalize reported 0)."""
        self._read_size()

    def _read_size(self) -> None:
        if self.layers and all(hasattr(m, "parametrizations") for m, _ in self.layers.values()):
            self.last_size_bytes = self.calibrated_hard()

    def metrics(self) -> dict[str, float]:
        """After finalize (the quantizers removed) the bytes estimated last, as finalize began:
        Result.summary() of a finalized model used to stop with an AttributeError from inside the estimate."""
        self._read_size()
        out = {"size_bytes": self.last_size_bytes, "size_lambda": self.lam,
               "size_scale": self.scale, "size_calibrations": float(self.calibrations)}
        if self.saliency is not None and self.saliency.mode == "rank":  # how much of the pull the last step removed
            out["saliency_neutralized"] = self.saliency.last_neutralized
        return out

    def state_dict(self):
        extra = self.saliency.state_dict() if self.saliency is not None else {}
        if self.split is not None:
            extra.update(self.split.state_dict())
        return {**extra, "lam": torch.tensor(self.lam, dtype=torch.float64), "scale": torch.tensor(self.scale, dtype=torch.float64),
                "fixed": torch.tensor(self.fixed, dtype=torch.float64),
                "start_bytes": torch.tensor(self.start_bytes, dtype=torch.float64),
                "frozen_at": torch.tensor(self.frozen_at), "trimmed": torch.tensor(self.trimmed),
                "late_checked": torch.tensor(self.late_checked)}

    def load_state_dict(self, state):
        self.lam, self.scale = float(state["lam"]), float(state["scale"])
        self.fixed, self.start_bytes = float(state["fixed"]), float(state["start_bytes"])
        self.frozen_at = int(state.get("frozen_at", torch.tensor(0)))
        self.trimmed = bool(state.get("trimmed", torch.tensor(False)))
        self.late_checked = bool(state.get("late_checked", torch.tensor(False)))
        if self.saliency is not None:
            self.saliency.load_state_dict(state)
        if self.split is not None:
            self.split.load_state_dict(state)


class SizeTerm(torch.autograd.Function):
    """The size term as one autograd node: (lam * c + penalty / 2 * c^2, the estimate), c = estimate
    / goal - 1, estimate = scale * sum of the layers' bytes (sparse_layer_bytes at the held widths)
    + fixed, from the layers' kept-weight counts and raw widths. Its backward is the closed form
    (sparse_layer_bytes_with_slopes; a width's bytes reach its raw parameter through the relaxed
    width's sigmoid, as in bits_ste), computed on plain floats: recorded through autograd the
    estimate was some forty nodes, about a tenth of a joint step on LeNet-300-100
    (benchmarks/step_cost.py). The value is `estimate()`'s in double precision."""

    @staticmethod
    def forward(ctx, counts, raw, held, span, numels, scale, fixed, goal, lam, penalty, split=None):
        value, d_count, d_bits = sparse_layer_bytes_with_slopes(counts.tolist(), numels, held.tolist())
        est = scale * sum(value) + fixed
        c = est / goal - 1
        slopes = [(lam + penalty * c) * scale / goal] * len(value)  # d term / d bytes of any layer
        term, errors = lam * c + 0.5 * penalty * c * c, []
        if split is not None:  # each layer also within a band around its ERK share (layer_split.py)
            band_term, band_slopes, errors = split.term(value, held.tolist(), (goal - fixed) / scale, penalty)
            term += scale / goal * band_term
            slopes = [s + scale / goal * b for s, b in zip(slopes, band_slopes)]
        sigmoids = (0.5 * (1 + math.tanh(0.5 * x)) for x in raw.tolist())
        d_raw = [s * d * width * sig * (1 - sig) for s, d, width, sig in zip(slopes, d_bits, span.tolist(), sigmoids)]
        ctx.save_for_backward(counts.new_tensor([s * d for s, d in zip(slopes, d_count)]), raw.new_tensor(d_raw))
        estimate, error = counts.new_tensor(est), counts.new_tensor(errors)
        ctx.mark_non_differentiable(estimate, error)
        return counts.new_tensor(term), estimate, error

    @staticmethod
    def backward(ctx, grad, *_):
        d_count, d_raw = ctx.saved_tensors
        return grad * d_count, grad * d_raw, *([None] * 9)

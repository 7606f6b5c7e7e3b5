"""From what the user wants (`recipe.target`: KiB, a ratio, or milliseconds) to per-layer budgets.

Why not a uniform sparsity: layers differ in size and in how much they tolerate. The
allocator gives each layer a *relative* density (how much of it to keep compared with the
others) and a bit-width, from a sensitivity scan when one is available and otherwise from a
cheap proxy (Erdos-Renyi-Kernel: keep more of small, fan-limited layers), then scales all
densities with one global factor until the artifact's **real** bytes hit the target.

Real bytes: every candidate is pruned (magnitude, per layer) and rounded onto its LSQ grid,
then encoded by the very encoder `artifact.save` uses, and the size of the
weights.safetensors file it would write is measured (packed values, bitmask or relative
indices, zstd, scales, fp32 biases and the safetensors header all count). So "size_kb: 20"
means a 20 KiB weights file on disk, within 2%.

Latency (`latency_ms`): per-group channel widths from measured latency tables, in
latency_targets.py.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .conversions import conversion_hint
from .block_drop import allocation_base
from .errors import RecipeError
from .recipe import Recipe, parse_recipe
from .schedules import progress, ramp
from .techniques.base import selected_layers
from .techniques.norm_storage import bake_norm_storage, fold_norms, norm_format_hint, norm_state_keys, round_norms
from .techniques.pruning import key as prune_key
from .techniques.size_estimate import embedding_hint
from .latency_targets import allocate_latency, resolve_latency, shrunk_copy  # noqa: E402,F401  (latency targets)

TOLERANCE = 0.02  # the promise: within 2% of the target
AIM = 0.003  # how close the bisection gets to its goal
MARGIN = 0.006  # aim this much below the target: trained weights encode slightly differently
MAX_LAYER_SPARSITY = 0.999  # the recipe's bound for layer_sparsity
STEER_MARGIN = 0.01  # the re-fits aim 1% under the target, so files land at or just under it


class TargetError(RecipeError):
    """The target cannot be met with the recipe's techniques and bounds."""


@dataclass
class Allocation:
    """Per-layer budgets and what they measured to."""

    sparsity: dict[str, float]
    bits: dict[str, int]
    bytes: int
    target_bytes: float
    numel: dict[str, int] | None = None

    @property
    def overall_sparsity(self) -> float:
        """Share of pruned weights over all pruned layers (what the technique reports)."""
        n = self.numel or {k: 1 for k in self.sparsity}
        return sum(self.sparsity[k] * n[k] for k in self.sparsity) / max(1, sum(n[k] for k in self.sparsity))


# -- the target in bytes ------------------------------------------------------------------

def target_bytes(model: nn.Module, target) -> float:
    """The weights-file size the target asks for (ratio is against the fp32 safetensors file)."""
    from .artifact.size import dense_fp32_bytes

    if target.size_kb is not None:
        return float(target.size_kb) * 1024
    return dense_fp32_bytes(model) / float(target.ratio)


# -- relative densities: proxy and scan ---------------------------------------------------

def erk_weights(layers: dict[str, nn.Module]) -> dict[str, float]:
    """Erdos-Renyi-Kernel density weights: sum of dimensions / product of dimensions.

    A cheap, data-free proxy (Evci et al., RigL): big matrices have many redundant weights,
    small ones (first conv, classifier) need a larger share to keep their rank.
    """
    return {name: erk_weight(m.weight.shape) for name, m in layers.items()}


def erk_weight(shape) -> float:
    """One weight shape's ERK density weight: sum of dimensions / product of dimensions."""
    return sum(shape) / math.prod(shape)


def scan_weights(layers: dict[str, nn.Module], scan: dict, tolerance: float) -> dict[str, float]:
    """Density weights from a sensitivity scan: 1 - the sparsity each layer tolerates alone."""
    from .sensitivity import tolerable_sparsity

    out = {}
    for name in layers:
        rec = scan["layers"].get(name)
        out[name] = 1.0 if rec is None else max(1e-3, 1.0 - tolerable_sparsity(rec["sparsity"], tolerance))
    return out


def scan_bits(layers: dict[str, nn.Module], scan: dict, tolerance: float, default: int) -> dict[str, int]:
    from .sensitivity import tolerable_bits

    return {n: tolerable_bits(scan["layers"][n]["bits"], tolerance, default) if n in scan["layers"] else default
            for n in layers}


# -- a candidate artifact, measured -------------------------------------------------------

class Candidate:
    """Builds the finalized model a given allocation would produce and measures its bytes."""

    def __init__(self, model: nn.Module, quant_layers: list[str], prune_layers: list[str], per_channel: bool,
                 sparsity_at_quant_start: float = 1.0, steps: dict[str, torch.Tensor] | None = None,
                 scores: dict[str, torch.Tensor] | None = None, copy_model: bool = True, as_rounded: bool = False):
        # on the CPU, where the artifact writer measures it (a GPU model's copy is moved; each probe then
        # encodes without another copy)
        self.model = (copy.deepcopy(model) if copy_model else model).cpu().eval()
        self.modules = dict(self.model.named_modules())
        self.original = {n: self.modules[n].weight.detach().clone() for n in quant_layers}
        rank = {n: v.cpu() for n, v in scores.items()} if scores else {n: self.original[n].abs() for n in prune_layers}
        self.order = {n: torch.argsort(rank[n].flatten(), descending=True) for n in prune_layers}
        self.quant_layers, self.per_channel = quant_layers, per_channel
        self.at_start = sparsity_at_quant_start
        self.steps = None if steps is None else {n: v.cpu() for n, v in steps.items()}  # trained LSQ steps, else estimated
        self.as_rounded = as_rounded  # kept weights priced as they round (zeros free), not as kept alive (build)
        self.biases = {n: self.modules[n].bias.detach().clone() for n in quant_layers
                       if isinstance(getattr(self.modules[n], "bias", None), torch.Tensor)}
        self.step_format, self.bias_format = "fp16", "fp16"  # as training stores them (artifact/precision.py)
        self.narrow: set[str] = set()  # tensors training keeps on fp16 values (store_norms_as)
        self.folded: list[str] = []  # BatchNorm layers stored folded (store_norms_as)

    @classmethod
    def from_training(cls, model: nn.Module, prune, quant, sparsity_at_quant_start: float = 1.0,
                      as_rounded: bool = False) -> "Candidate":
        """A candidate made of the run's current state: dense trained weights, ranked by the
        pruning technique's scores, on the trained LSQ steps (what finalize would store), or
        on estimated steps when LSQ has not started yet (sequential runs). `as_rounded`: every
        kept weight priced as it rounds on the trained steps now (build)."""
        from torch.nn.utils import parametrize

        from .block_drop import as_dropped, collapse_faded
        from .model_copy import plain_copy

        plain = plain_copy(model)
        collapse_faded(as_dropped(plain))  # the blocks prune_blocks fades out are not in the file: not priced either
        present = dict(plain.named_modules())
        steps, scores = {}, {}
        names = [n for n in (list(quant.quantizers) if quant.attached else list(selected_layers(model, quant.config)))
                 if n in present]
        for name in names:
            layer = plain.get_submodule(name)
            if quant.attached:
                steps[name] = quant.quantizers[name].step.detach().clone()
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
                if parametrize.is_parametrized(layer, "bias"):  # the bias as training stores it
                    parametrize.remove_parametrizations(layer, "bias", leave_parametrized=True)
            if hasattr(layer, "input_quant"):
                del layer.input_quant
        bake_norm_storage(plain)
        learned = prune.config.criterion == "learned"  # magnitude re-ranks |w| as the weights are now
        for name in prune.layers:
            if name in names:
                layer = plain.get_submodule(name)
                scores[name] = prune.masks[prune_key(name)].scores.detach().clone() if learned else layer.weight.detach().abs()
        cand = cls(plain, names, list(scores), quant.config.per_channel, sparsity_at_quant_start,
                   steps=steps or None, scores=scores, copy_model=False, as_rounded=as_rounded and quant.attached)
        cand.step_format, cand.bias_format = quant.config.stored_scale_format, quant.config.bias_format
        cand.store_norms_as(quant.config.stored_norm_format)  # before quantization starts too
        return cand

    def store_norms_as(self, fmt: str) -> None:
        """Normalization layers as the run will store them (quant_lsq.norm_format): with fp16,
        rounded and measured in fp16; otherwise every tensor no technique compresses is measured
        wide, even one whose values happen to be fp16 now (an untrained BatchNorm): training
        moves them. fp16_folded: rounded, then each BatchNorm folded into its stored affine."""
        if fmt in ("fp16", "fp16_folded"):
            round_norms(self.model)
            self.narrow = set(norm_state_keys(self.model))
        if fmt == "fp16_folded":
            self.folded = fold_norms(self.model)

    def _kept(self, name: str, sparsity: float) -> torch.Tensor:
        w = self.original[name]
        if name not in self.order:
            return torch.ones_like(w, dtype=torch.bool)
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        keep[self.order[name][: round(w.numel() * (1 - sparsity))]] = True
        return keep.view_as(w)

    @torch.no_grad()
    def build(self, sparsity: dict[str, float], bits: dict[str, int]):
        """The finalized model and spec of an allocation, as trained weights tend to look.

        Two deliberate differences from naive post-training quantization, both measured
        against trained artifacts: kept weights stay non-zero (training keeps them alive, so
        they cost value bytes; unless `as_rounded`, priced as they round on the trained step: at
        2 bits many round to zero, and priced as values they made a sequential file land far under
        its target, see SizeSteering), and the step is LSQ's initial step taken when quantization
        *starts*, i.e. on the weights pruned to the sparsity the schedule has reached then
        (`sparsity_at_quant_start` of the target): LSQ moves its step little after that, so
        the weights that survive the rest of the ramp, larger than that step's reference,
        spread over more levels. (A fixed factor on the final weights' step, fitted at 99%
        sparsity, missed the target by 12% at 30% sparsity.)
        """
        from .artifact.precision import round_bias, round_step
        from .spec import CompressionSpec, LayerSpec
        from .techniques.quant_lsq import lsq_init_step

        spec = CompressionSpec(folded_norms=list(self.folded))
        for name in self.quant_layers:
            target = sparsity.get(name, 0.0)
            keep = self._kept(name, target)
            w = self.original[name] * keep
            qmax = 2 ** (bits[name] - 1) - 1
            if self.steps is not None:
                step = self.steps[name]
            else:
                step = lsq_init_step(self.original[name] * self._kept(name, target * self.at_start), qmax, self.per_channel)
            step = round_step(step, self.step_format)
            q = torch.clamp(torch.round(w / step), -qmax, qmax)
            if not self.as_rounded:
                q = torch.where(keep & (q == 0), torch.sign(w), q)
            self.modules[name].weight.data.copy_(q * step)
            scale = step.flatten().expand(w.shape[0]).clone() if step.numel() == 1 else step.flatten().clone()
            if name in self.biases:
                self.modules[name].bias.data.copy_(round_bias(self.biases[name], self.bias_format, scale))
            spec.layers[name] = LayerSpec(bits=bits[name], scale=scale)
        return self.model, spec

    def file_bytes(self, sparsity: dict[str, float], bits: dict[str, int]) -> int:
        """Exact size of the weights file that `artifact.save` would write."""
        from .artifact.encode import encode_model
        from .artifact.store import file_blob

        model, spec = self.build(sparsity, bits)
        return len(file_blob(encode_model(model, spec, narrow=self.narrow.__contains__)))  # what save() writes


# -- the size allocator -------------------------------------------------------------------

def densities(weights: dict[str, float], g: float, floor: dict[str, float]) -> dict[str, float]:
    """Sparsity per layer at global factor g: density = clip(g * weight, floor, 1)."""
    return {n: 1.0 - min(1.0, max(floor[n], g * w)) for n, w in weights.items()}


def fit_global(cand: Candidate, weights: dict[str, float], floor: dict[str, float], bits: dict[str, int],
               goal: float, iters: int = 40, lo: float = 1e-6, hi: float | None = None) -> tuple[dict[str, float], int]:
    """Bisect the global density factor (log scale) until the measured bytes are at `goal`."""
    hi = hi if hi is not None else 1.0 / max(min(weights.values()), 1e-9)
    best = (densities(weights, lo, floor), cand.file_bytes(densities(weights, lo, floor), bits))
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        sp = densities(weights, mid, floor)
        size = cand.file_bytes(sp, bits)
        if size <= goal:
            lo, best = mid, (sp, size)
        else:
            hi = mid
        if abs(best[1] - goal) <= AIM * goal or hi / lo < 1.0 + 1e-6:
            break
    return best


def allocate_size(model: nn.Module, recipe: Recipe, example_inputs, scan: dict | None = None,
                  tolerance: float = 0.01, base: nn.Module | None = None) -> Allocation:
    """Per-layer sparsity and bits whose artifact weighs the target, measured. `base`: the model
    the file will hold (block_drop.allocation_base: without the blocks prune_blocks drops),
    whose layers share the bytes; the target's ratio stays relative to `model`."""
    prune, quant = recipe.technique("prune_unstructured"), recipe.technique("quant_lsq")
    goal = target_bytes(model, recipe.target)
    model = base if base is not None else model
    qlayers = selected_layers(model, quant)
    players = {n: m for n, m in selected_layers(model, prune).items() if n in qlayers}
    at_start = sparsity_at_quant_start(quant.start, (prune.start, prune.end), prune.schedule)  # fractions of the run
    cand = Candidate(model, list(qlayers), list(players), quant.per_channel, at_start)
    cand.step_format, cand.bias_format = quant.stored_scale_format, quant.bias_format
    cand.store_norms_as(quant.stored_norm_format)
    weights = scan_weights(players, scan, tolerance) if scan else erk_weights(players)
    base_bits = scan_bits(qlayers, scan, tolerance, quant.bits) if scan else {n: quant.bits for n in qlayers}
    floor = {n: max(prune.min_keep, 1.0 - MAX_LAYER_SPARSITY, 1.0 / m.weight.numel()) for n, m in players.items()}
    dense = {n: 0.0 for n in players}
    sparsest = {n: 1.0 - floor[n] for n in players}
    bits = choose_bits(cand, base_bits, sparsest, dense, goal)
    _say_bits_moved(base_bits, bits, "bits" in quant.model_fields_set and not scan, goal)
    sparsity, size = fit_global(cand, weights, floor, bits, goal * (1 - MARGIN))
    sparsity.update({n: 0.0 for n in selected_layers(model, prune) if n not in sparsity})  # stored fp32 anyway
    if size < goal * (1 - TOLERANCE):
        warnings.warn(f"target: the densest allocation at {max(bits.values())} bits is {size} B, "
                      f"below the {goal:.0f} B asked for; using it", stacklevel=3)
    numel = {n: m.weight.numel() for n, m in selected_layers(model, prune).items()}
    return Allocation(sparsity, bits, size, goal, numel)


def sparsity_at_quant_start(quant_start, prune_window: tuple, schedule: str) -> float:
    """The share of its target sparsity a layer has when LSQ starts (and sets its step); in
    fractions of the run before training, in steps during it."""
    return ramp(1.0, progress(quant_start, *prune_window), schedule)


def _say_bits_moved(asked: dict[str, int], chosen: dict[str, int], set_by_user: bool, goal: float) -> None:
    """quant_lsq.bits the user wrote, moved by the allocator (choose_bits): a 2-bit recipe under a target that
    even its dense model undershoots trained at 6 bits, and only the table's bits column said so."""
    moved = sorted({(asked[n], chosen[n]) for n in asked if asked[n] != chosen[n]})
    if not set_by_user or not moved:
        return
    was, now = moved[0]
    why = ("even the model without pruning at that width is smaller than the target, so the bytes are spent on wider "
           "values, sparsity filling the rest" if now > was else
           "even the sparsest model the recipe allows at that width is larger than the target")
    warnings.warn(f"target: quant_lsq.bits {was} is {'raised' if now > was else 'lowered'} to {now}: {why} "
                  f"({goal:,.0f} B); mode: joint keeps the width as written (or give a "
                  f"{'smaller' if now > was else 'larger'} target)", stacklevel=4)


def choose_bits(cand: Candidate, base: dict[str, int], sparsest: dict, dense: dict, goal: float) -> dict[str, int]:
    """Shift all bit-widths together from `base`: down while even the sparsest model is too
    big, up while even the dense model is too small (sparsity then fills the rest)."""
    shift = 0
    bits = lambda k: {n: min(8, max(2, b + k)) for n, b in base.items()}  # noqa: E731
    while cand.file_bytes(sparsest, bits(shift)) > goal:
        if all(b == 2 for b in bits(shift).values()):
            from .artifact.size import floor_detail

            raise TargetError(
                f"target: {goal / 1024:.2f} KiB ({goal:,.0f} B) cannot be planned: it is below the smallest artifact "
                f"the allocator can plan for this recipe (2-bit, every layer at its floor: prune_unstructured.min_keep, at most "
                f"{MAX_LAYER_SPARSITY:.1%} sparsity; every kept weight counted, though 2-bit training may round "
                f"some of them to zero): {cand.file_bytes(sparsest, bits(shift)):,} B: "
                f"{floor_detail(*cand.build(sparsest, bits(shift)))}. Raise target.size_kb (or lower "
                "target.ratio), or lower prune_unstructured.min_keep" + norm_format_hint(cand.model)
                + embedding_hint(cand.model, cand.quant_layers) + conversion_hint(cand.model)
            )
        shift -= 1
    while shift >= 0 and any(b < 8 for b in bits(shift).values()) and cand.file_bytes(dense, bits(shift)) < goal:
        shift += 1
    return bits(shift)


# -- closing the loop on a size target ----------------------------------------------------

STEER_AT = 0.8  # share of the pruning ramp after which the budgets are re-fitted
TRIM_AT = 0.9  # share of the run after which the masks are trimmed onto the target once more
# the trim may give back at most this factor of density: weights its masks let back in after the ramp have
# trained masked (small, rounding to +-1 by the re-fit's measure), and a re-fit that opened them wide was
# measured 20% under what they then coded to (a 15-step run: every layer dense, the file 3% over)
TRIM_DENSIFY = 1.05
REQUANT_UNDER = 0.05  # a file this far under its goal on LSQ's first rounding is re-fitted then (SizeSteering)
# that re-fit prices every weight as it rounds now (exact for the state it leaves), so it may open layers this wide:
# the weights let back in that grow off level 0 later are cut again by the trim, which may then cut as far
REQUANT_DENSIFY = 16.0
# after such a re-fit, the file is measured this many times, evenly between it and the trim, and cut where it grew over
# its goal: the weights let back in grow off level 0 as they train, and one cut at the trim, 10% of the run before the
# end, had to take them all at once (a 2-bit LeNet-5 at 200x from 2,000 images ended at 61.9% test accuracy, its other
# seeds at 94%; re-checked, 74.8%: compare_lenet5_2k_sens_val)
RECHECKS = 2
TRIM_DROP_WARNING = 0.05  # a kept metric this share under the one before the trim is said (SizeSteering.on_end)


class SizeSteering:
    """Loop callback that makes a size target land. The allocator had to guess how trained
    weights will encode (their spread, the LSQ steps), so the run's own state decides twice:

    1. once the pruning ramp is STEER_AT done (weights trained, masks nearly final), the
       per-layer sparsity is re-fitted from `Candidate.from_training`, keeping the layers'
       relative densities, and the ramp finishes at the new targets;
    1b. where the masks were fitted before LSQ started (sequential runs; an overlap run whose LSQ
       starts after the steering), once LSQ rounds them the file is measured as the writer stores
       it (kept weights at level 0 are zeros; at 2 bits many are), and one more
       than REQUANT_UNDER under the goal is re-fitted then (unless target.refit_on_rounding is false: at
       LeNet-300-100 2 bits over 12 epochs it cost half a point, on LeNet-5 it helps), with the rest of the
       run to train the weights let back in (the late trim may give back only TRIM_DENSIFY), and the trim prices
       such zeros as zeros too; a file near its goal leaves the run as it was; after such a re-fit
       the file is re-checked RECHECKS times before the trim and cut where it grew over its goal;
    2. weights keep spreading over more quantization levels while they train on (LeNet-300
       on MNIST: +2.7% of bytes from half-way to the end of a run, benchmarks/size_targets.py),
       so at TRIM_AT of the run (or the end of the ramp, if later) the sparsity is re-fitted
       again and the masks move to it at once; states kept before that are forgotten (they
       are another size).

    The file then comes out within 0.3% of the bytes predicted at the trim
    (benchmarks/size_targets.py), so the re-fits aim STEER_MARGIN under the target; in the 60
    MNIST compare runs of BENCHMARKS.md the files landed 0.4% to 1.3% under it. Every rank
    computes the same re-fit from bit-identical weights; the targets and how many re-fits
    happened are checkpointed technique state, so a resumed run neither repeats nor skips them.
    """

    def __init__(self, goal_bytes: float, refit_on_rounding: bool = True):
        self.goal = float(goal_bytes)
        self.refit_on_rounding = refit_on_rounding  # 1b (target.refit_on_rounding)
        self.best_before_trim: float | None = None  # the kept metric the trim made the run forget

    def on_step(self, trainer, step: int, out) -> None:
        # where it stands is read from the technique each time, so a resume or a rollback to an
        # earlier snapshot repeats exactly what that state had not done yet
        prune = next((t for t in trainer.techniques if t.kind == "prune_unstructured"), None)
        quant = next((t for t in trainer.techniques if t.kind == "quant_lsq"), None)
        if prune is None or quant is None or not prune.config.layer_sparsity or prune.retarget_count >= 2:
            return
        if not prune.attached:
            return
        p = progress(step, *prune.window)
        total = trainer.plan.total_steps
        trim_at = trim_step(total, prune.window[1])
        if prune.retarget_count == 0 and STEER_AT <= p < 1.0 and step < trim_at:
            self._refit(trainer, step, prune, quant, "size_steering", now=False)
            prune.rounding_check = int(quant.attached)
        elif not prune.rounding_check and quant.attached and p >= 1.0 and step < trim_at:
            self._check_rounding(trainer, step, prune, quant)
        elif 2 <= prune.rounding_check < 2 + RECHECKS and step < trim_at:
            self._recheck(trainer, step, trim_at, prune, quant)
        elif step >= trim_at:
            if trim_at < max(math.ceil(TRIM_AT * total), prune.window[1]) and not self._over(trainer):
                prune.retarget_count = 2  # a short run under its target keeps its masks (see trim_step)
                return
            requant = prune.rounding_check >= 2  # weights priced as they round, and cut as far as the re-fit opened
            self._refit(trainer, step, prune, quant, "size_trim", now=True, as_rounded=requant,
                        shrink=1 / REQUANT_DENSIFY if requant else None)
            prune.retarget_count = 2
            self.best_before_trim = trainer.history.best_metric
            trainer.history.events[-1]["best_before"] = self.best_before_trim  # checkpointed: a resumed run reads it
            trainer.forget_best()

    def on_end(self, trainer) -> None:
        """The trim moves the masks at once, 10% of the run before its end, and forgets the states kept
        before it (another size): where that cut costs more than the rest of the run recovers, the run
        ends far below what it had reached, which makes joint look better in a comparison. Said, with the
        numbers. (Most of such a drop was BatchNorm's running statistics describing the untrimmed model: a
        depthwise-separable CNN kept 0.30-0.42 of its 0.93 until training.recalibrate_norms re-estimated
        them before each evaluation, benchmarks/norm_recalibration.py.)"""
        before, now = self.best_before_trim, trainer.history.best_metric
        if before is None:  # a run resumed after its trim: the trim's event (in the checkpointed history) holds it
            trims = [e for e in getattr(trainer.history, "events", []) if e.get("event") == "size_trim"]
            before = trims[-1].get("best_before") if trims else None
        if before is None or now is None or not trainer.recipe.training.metric_rises():
            return
        if now < before - TRIM_DROP_WARNING * abs(before):
            metric = trainer.recipe.training.metric
            warnings.warn(f"size target: the late trim (at {TRIM_AT:.0%} of the run the masks moved at once onto the "
                          f"re-fitted target) dropped the kept {metric} from {before:.4g} to {now:.4g}, and the run "
                          "ends there (the states before it were another size); more epochs give the trimmed model "
                          "more steps to recover", stacklevel=2)

    def _check_rounding(self, trainer, step, prune, quant) -> None:
        """Once LSQ rounds the masked weights (fitted before it started): re-fit, masks moved at once, where the file
        the current masks would write is more than REQUANT_UNDER under the goal; the check is an event either way."""
        from .techniques.size_estimate import measured_bytes

        now = measured_bytes(trainer.model, trainer.session.ctx.example_inputs)["total"]
        refit = self.refit_on_rounding and now < self.goal * (1 - REQUANT_UNDER)
        prune.rounding_check = 2 if refit else 1
        trainer.history.events.append({"step": step, "event": "size_rounding_check", "goal_bytes": round(self.goal),
                                       "predicted_bytes": now, "refit": refit})
        if refit:
            self._refit(trainer, step, prune, quant, "size_requant", now=True, densify=REQUANT_DENSIFY, as_rounded=True)
            prune.retarget_count = 1  # the trim still comes

    def _recheck(self, trainer, step, trim_at, prune, quant) -> None:
        """After a re-fit on LSQ's rounding (rounding_check 2), at the k-th of RECHECKS even points between it and the
        trim (rounding_check 1 + k): cut the masks at once, priced as rounded, where the file has grown over its goal,
        so the trim at the end has little left to take. The points come from the check's own event (checkpointed)."""
        from .techniques.size_estimate import measured_bytes

        checked = [e["step"] for e in trainer.history.events if e.get("event") == "size_rounding_check"]
        start = checked[-1] if checked else prune.window[1]
        k = prune.rounding_check - 1
        if step < start + k * (trim_at - start) / (RECHECKS + 1):
            return
        now = measured_bytes(trainer.model, trainer.session.ctx.example_inputs)["total"]
        prune.rounding_check += 1
        trainer.history.events.append({"step": step, "event": "size_recheck", "goal_bytes": round(self.goal),
                                       "predicted_bytes": now, "refit": now > self.goal})
        if now > self.goal:
            self._refit(trainer, step, prune, quant, "size_recheck_cut", now=True, as_rounded=True,
                        shrink=1 / REQUANT_DENSIFY)
            prune.retarget_count = 1  # the trim still comes

    def _over(self, trainer) -> bool:
        from .techniques.size_estimate import measured_bytes

        return measured_bytes(trainer.model, trainer.session.ctx.example_inputs)["total"] > self.goal

    def _refit(self, trainer, step, prune, quant, event: str, now: bool, densify: float | None = None,
               as_rounded: bool = False, shrink: float | None = None) -> None:
        before = {n: prune.layer_target(n) for n in prune.layers}
        densify = densify or (TRIM_DENSIFY if now else 4.0)
        sparsity, predicted = steer(trainer.model, prune, quant, self.goal, densify=densify, as_rounded=as_rounded,
                                    shrink=shrink or 0.25)
        prune.retarget(sparsity, now=now)
        trainer.history.events.append({"step": step, "event": event, "goal_bytes": round(self.goal),
                                       "predicted_bytes": predicted, "layer_sparsity_before": before,
                                       "layer_sparsity_after": dict(prune.retargeted)})


def trim_step(total: int, ramp_end: int) -> int:
    """The step after which the masks are trimmed onto the target: TRIM_AT of the run, the ramp's end if
    later, and in a short run no later than the step before the last, so that one step still trains the
    trimmed masks (at 90% of 16 steps it was the last step, which the trim skipped: no re-fit ran at all
    and files missed their target by 9-17%). Pulled that early, it trims only a file over the target: a
    re-fit this soon after quantization starts mis-measures what the last steps move (an 8-step run
    under its target landed 7% under, against 3% untrimmed)."""
    return max(min(math.ceil(TRIM_AT * total), total - 2), ramp_end, 0)


def steer(model: nn.Module, prune, quant, goal: float, densify: float = 4.0, as_rounded: bool = False,
          shrink: float = 0.25) -> tuple[dict[str, float], int]:
    """Per-layer sparsity whose artifact, measured from the run's current state, is `goal` bytes; no
    layer more than `densify` times as dense as its target now, nor less than `shrink` times. `as_rounded`:
    kept weights at LSQ's level 0 priced as zeros (Candidate.from_training)."""
    at_start = sparsity_at_quant_start(quant.window[0], prune.window, prune.config.schedule)  # LSQ attaches then
    cand = Candidate.from_training(model, prune, quant, at_start, as_rounded=as_rounded)
    names = [n for n in prune.layers if n in cand.original]
    density = {n: max(1e-9, 1.0 - prune.layer_target(n)) for n in names}
    floor = {n: max(prune.config.min_keep, 1.0 - MAX_LAYER_SPARSITY, 1.0 / cand.original[n].numel()) for n in names}
    layer_bits = quant.config.layer_bits or {}
    bits = {n: layer_bits.get(n, quant.config.bits) for n in cand.quant_layers}
    aim = goal * (1 - STEER_MARGIN)
    sparsity, size = fit_global(cand, density, floor, bits, aim, lo=shrink, hi=max(4.0, densify))
    if any(1.0 - sparsity[n] > densify * density[n] for n in names):  # the same search below the cap
        sparsity, size = fit_global(cand, density, floor, bits, aim, lo=shrink, hi=densify)
    return {n: min(MAX_LAYER_SPARSITY, sparsity[n]) for n in names}, size


# -- the public entry point ---------------------------------------------------------------

def resolve_target(model: nn.Module, recipe: Recipe | dict, example_inputs, evaluate=None, sensitivity: dict | None = None,
                   norm_batches=None) -> Recipe:
    """A new recipe with `recipe.target` turned into per-layer budgets.

    size_kb / ratio: fills prune_unstructured.layer_sparsity (scope: layer) and
    quant_lsq.layer_bits; missing techniques are added with their defaults, since both
    are needed to shrink the stored bytes. The target stays, marked `allocated`, so that
    compress() steers the bytes onto it during training (SizeSteering) without allocating
    again; a latency target is cleared. With `evaluate` (or a precomputed `sensitivity`
    scan), sensitive layers keep more weights and bits (allocation_scan; `norm_batches`: training
    inputs a BatchNorm model's scan re-estimates its statistics on); without, the ERK proxy is used.
    latency_ms / speedup: sets prune_structured.layer_sparsity (added if missing) to per-group widths
    allocated from measured latency tables and confirmed by timing (latency_targets.py).
    """
    recipe = parse_recipe(recipe)
    if recipe.target is not None and recipe.target.allocated:
        budget = recipe.technique("size_budget")
        if budget is not None and budget.target_bytes is not None:
            return recipe
        prune = recipe.technique("prune_unstructured")
        if not recipe.target.is_latency and (prune is None or not prune.layer_sparsity):
            raise TargetError("target.allocated: true is set by the allocator once prune_unstructured.layer_sparsity "
                              "holds the budgets; remove target.allocated to let jointcompress allocate them")
        return recipe
    if recipe.target is None:
        return recipe
    _check_allocator(recipe, evaluate, sensitivity)
    data = recipe.model_dump()
    data["target"] = None
    if recipe.technique("size_budget") is not None and not recipe.target.is_latency:
        return _with_size_budget(data, recipe, target_bytes(model, recipe.target))
    if recipe.target.is_latency:
        return resolve_latency(model, data, example_inputs, recipe.target)
    if recipe.technique("prune_structured") is not None:
        raise TargetError("target.size_kb/ratio allocates unstructured sparsity and bits; remove prune_structured "
                          "from techniques, or use target.latency_ms (which allocates channel sparsity); for both, "
                          "use mode: joint (its size budget measures the file with the channels removed), or compress "
                          "in two runs: prune_structured first, then the size target on the finalized model")
    kinds = [t["type"] for t in data["techniques"]]
    data = _with_size_techniques(data)
    full = parse_recipe({**data, "target": recipe.target.model_dump()}, source="resolved target")
    if sensitivity is None and evaluate is not None:
        sensitivity = allocation_scan(model, full, example_inputs, evaluate, norm_batches)
    alloc = allocate_size(model, full, example_inputs, scan=sensitivity,
                          base=allocation_base(model, data, example_inputs))
    data["target"] = {**recipe.target.model_dump(), "allocated": True}  # compress() steers toward it
    _say_added(kinds)
    return _with_budgets(data, alloc)


def _check_allocator(recipe: Recipe, evaluate, sensitivity: dict | None) -> None:
    """target.allocator: sensitivity needs something to scan with, and is said where nothing reads it."""
    if recipe.target.allocator != "sensitivity":
        return
    if recipe.target.is_latency or recipe.technique("size_budget") is not None:
        warnings.warn("target.allocator: sensitivity shares a size target's bytes among the layers in modes sequential "
                      "and overlap; " + ("a latency target allocates channel widths from timings" if recipe.target.is_latency
                                         else "mode: joint learns its own per-layer sparsity under one size budget")
                      + ", so it is not read", stacklevel=3)
    elif evaluate is None and sensitivity is None:
        raise TargetError("target.allocator: sensitivity scans the model with an evaluate function before allocating: "
                          "pass evaluate= to resolve_target (compress() passes its own; with prepare(), resolve the "
                          "target first and prepare the resolved recipe) or a scan as sensitivity= (`jointcompress "
                          "sensitivity` writes one), or use allocator: erk")


def allocation_scan(model: nn.Module, recipe: Recipe, example_inputs, evaluate, norm_batches=None) -> dict:
    """The sensitivity scan the size allocator reads (sensitivity.scan): the layers the recipe's pruning and
    quantization select, each pruned and rounded alone, no channel groups; `evaluate` may return a dict or a number."""
    from .sensitivity import scan

    full = parse_recipe(_with_size_techniques(recipe.model_dump()), source="resolved target")
    layers = sorted(set(selected_layers(model, full.technique("prune_unstructured")))
                    | set(selected_layers(model, full.technique("quant_lsq"))))
    return scan(model, evaluate, example_inputs, metric=recipe.training.metric, groups=False, layers=layers,
                greater_is_better=recipe.training.metric_rises(), norm_batches=norm_batches)


def _say_added(kinds: list[str]) -> None:
    """The techniques the allocator added to the recipe (it writes its budgets into both), said once the target is
    planned: only the manifest's recipe showed a low-bit, sparse artifact of a recipe that listed distillation alone."""
    added = [k for k in ("prune_unstructured", "quant_lsq") if k not in kinds]
    if added:
        warnings.warn(f"target: a size target is met by pruning and low-bit weights together, so {' and '.join(added)} "
                      f"{'was' if len(added) == 1 else 'were'} added to the recipe, with every layer's "
                      f"{' and '.join(WHAT_SET[k] for k in added)} from the allocator (the manifest's recipe holds them)",
                      stacklevel=3)


WHAT_SET = {"prune_unstructured": "sparsity", "quant_lsq": "bit-width"}  # what the allocator writes into each


PLAN_SLACK = 1.02  # before training, a target is refused only if a file this much larger cannot be planned either
NOTHING_TRAINED = "Checked on the untrained model, before training it; nothing was trained."  # under such a refusal
NOTHING_COMPRESSED = "Checked on the model of --weights, before compressing it; nothing was trained."


def refusal_before_training(untrained: nn.Module, recipe: Recipe, example_inputs) -> TargetError | None:
    """Why the allocator cannot plan `recipe`'s size target, checked on an untrained model, or None.
    What refuses a target (2 bits, every layer at prune_unstructured.min_keep, the tensors no technique
    compresses) depends on the architecture, not on the trained values, so a command learns it in seconds
    rather than after training the model first (an hour, for some models). Refused only where a file
    PLAN_SLACK larger cannot be planned either (near the floor the trained model decides); the error then
    carries the exact target's words. A latency target: latency_targets.refusal_before_training (the
    narrowest model allowed, timed)."""
    target = recipe.target
    if target is None:
        return None
    if target.is_latency:
        from .latency_targets import refusal_before_training as latency_refusal

        return latency_refusal(untrained, recipe, example_inputs)
    slack = {"ratio": target.ratio / PLAN_SLACK} if target.ratio is not None else {"size_kb": target.size_kb * PLAN_SLACK}
    erk = {**target.model_dump(), "allocator": "erk"}  # the floor is the same for any sharing (an untrained model's scan is not)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run says them, with its own numbers
        try:  # a ratio within the slack of 1 (or a size past float's range) has no slackened form: the run decides
            slackened = parse_recipe({**recipe.model_dump(), "target": {**erk, **slack}})
        except RecipeError:
            return None
        for candidate in (slackened, parse_recipe({**recipe.model_dump(), "target": erk})):
            try:
                resolve_target(untrained, candidate, example_inputs)
                return None
            except TargetError as err:
                refusal = err
    return refusal


def warn_unused_sparsity(recipe: Recipe) -> None:
    """A user's recipe with a size target (not yet allocated) and an explicit prune_unstructured.sparsity:
    the allocator (sequential, overlap) or the joint form's size budget sets every layer's sparsity
    itself, so the number is not used. Likewise a latency target (latency_ms / speedup) and an explicit
    prune_structured.sparsity: the latency allocator sets every channel group's width. Read from the
    fields the user set (a recipe re-parsed from a dump has them all)."""
    target = recipe.target
    if target is None or target.allocated:
        return
    if target.is_latency:
        structured = recipe.technique("prune_structured")
        if structured is not None and "sparsity" in structured.model_fields_set and structured.sparsity is not None:
            warnings.warn(f"target: prune_structured.sparsity {structured.sparsity:g} is not used; the latency target "
                          "decides every channel group's width (its allocator sets prune_structured.layer_sparsity to "
                          "meet the target) (remove sparsity, or the target)", stacklevel=3)
        return
    prune = recipe.technique("prune_unstructured")
    if prune is not None and "sparsity" in prune.model_fields_set and prune.sparsity is not None:
        who = ("the joint form learns each layer's sparsity under the size budget" if recipe.mode == "joint"
               else "the size target's allocator sets each layer's sparsity to meet the target")
        warnings.warn(f"target: prune_unstructured.sparsity {prune.sparsity:g} is not used; {who} (remove sparsity, "
                      "or the target)", stacklevel=3)
    quant = recipe.technique("quant_lsq")
    given = [f"{t.type}.{key}" for t, key in ((prune, "layer_sparsity"), (quant, "layer_bits"))
             if t is not None and getattr(t, key, None)]
    if given:  # replaced by the allocator's (sequential, overlap) or dropped by the joint form, without a word
        warnings.warn(f"target: {' and '.join(given)} {'is' if len(given) == 1 else 'are'} not used; the size target "
                      "decides every layer's sparsity and bits (remove them, or the target)", stacklevel=3)


def _with_size_budget(data: dict, recipe: Recipe, goal: float) -> Recipe:
    """Joint runs learn their per-layer sparsity and bits under the budget: no allocation,
    no steering; the target's bytes go to size_budget, which lands on them in training."""
    for t in data["techniques"]:
        if t["type"] == "size_budget":
            t["target_bytes"] = float(goal)
    data["target"] = {**recipe.target.model_dump(), "allocated": True, "steer": False}
    return parse_recipe(data, source="resolved target")


def _with_size_techniques(data: dict) -> dict:
    """The recipe with prune_unstructured and quant_lsq, which the allocator's budgets are written into (the one
    it lacks is added with its defaults; resolve_target says so once the target is planned)."""
    kinds = [t["type"] for t in data["techniques"]]
    if "prune_unstructured" not in kinds:
        data["techniques"].insert(0, {"type": "prune_unstructured", "sparsity": 0.0, "scope": "layer"})
    if "quant_lsq" not in kinds:  # sequential starts it at its quantize phase, the other modes at 0.3 of the run
        data["techniques"].append({"type": "quant_lsq", "bits": 4, "start": 0.0 if data.get("mode") == "sequential" else 0.3})
    return data


def _with_budgets(data: dict, alloc: Allocation) -> Recipe:
    for t in data["techniques"]:
        if t["type"] == "prune_unstructured":
            t["scope"], t["layer_sparsity"] = "layer", dict(alloc.sparsity)
            t["sparsity"] = min(MAX_LAYER_SPARSITY, alloc.overall_sparsity)
        elif t["type"] == "quant_lsq":
            t["layer_bits"] = dict(alloc.bits)
    return parse_recipe(data, source="resolved target")

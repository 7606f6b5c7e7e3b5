"""Recipes: a validated list of techniques plus how to train and how to schedule them.

A recipe is YAML or a Python dict. Every field has bounds, unknown keys are rejected, and
each technique carries a `type` discriminator, so a typo fails before any training starts
with a message that names the field, the bad value and what is allowed.
"""
from __future__ import annotations

import difflib
import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import RecipeError


class Strict(BaseModel):
    # allow_inf_nan=False: a NaN or inf in any number is refused as "not a finite number", where a bounded field
    # would otherwise blame its bound (NaN fails every comparison)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_yes_no_for_numbers(cls, data):
        """YAML reads `true` / `false` as booleans, and pydantic takes them as 1 / 0 for a number field:
        `epochs: true` ran one epoch without a word."""
        if isinstance(data, dict):
            for key, value in data.items():
                info = cls.model_fields.get(key) if isinstance(key, str) else None
                if info is None:
                    continue
                if isinstance(value, bool) and _number_not_bool(info.annotation):
                    raise ValueError(f"{key}: {str(value).lower()} is a yes/no, not a number; give {key} a number")
                _no_yes_no_inside(key, value, info.annotation)
        return data


def _no_yes_no_inside(key: str, value, annotation) -> None:
    """The same for the numbers of a dict or list field (`layer_sparsity: {fc2: no}` ran at 0.0, `student_layers:
    [no, yes]` as [0, 1], without a word)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    inner = _element_type(annotation, dict if isinstance(value, dict) else list)
    for where, item in items:
        if isinstance(item, bool) and inner is not None and _number_not_bool(inner):
            raise ValueError(f"{key}[{where!r}]: {str(item).lower()} is a yes/no, not a number; give it a number")


def _element_type(annotation, container):
    """The value type of a dict field (`container` dict) or the item type of a list field, unwrapping Annotated and
    unions; None where the field is neither."""
    todo = [annotation]
    while todo:
        t = todo.pop()
        origin = get_origin(t)
        if origin is container and get_args(t):
            return get_args(t)[-1]
        if origin in (Annotated, Union) or type(t).__name__ == "UnionType":
            todo.extend(get_args(t)[:1] if origin is Annotated else get_args(t))
    return None


def _number_not_bool(annotation) -> bool:
    """Whether a field's type takes an int or a float but no bool (Annotated and unions unwrapped)."""
    kinds, todo = set(), [annotation]
    while todo:
        t = todo.pop()
        if get_origin(t) in (Annotated, Union) or type(t).__name__ == "UnionType":
            todo.extend(get_args(t)[:1] if get_origin(t) is Annotated else get_args(t))
        else:
            kinds.add(t)
    return bool(kinds & {int, float}) and bool not in kinds


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
MIN_BITS, MAX_BITS = 2, 8  # quant_lsq's range of learned bit-widths unless the recipe narrows it


class Selection(Strict):
    """Which layers a technique touches: glob patterns over module names."""

    targets: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    exclude: list[str] = Field(default_factory=list)


class MaskSchedule(Selection):
    """What every mask-based pruning technique shares: scope, ramp window, sharpening, scores."""

    scope: Literal["global", "layer"] = "layer"
    schedule: Literal["cubic", "linear", "constant"] = "cubic"
    start: Fraction = 0.0
    end: Fraction = 0.6
    update_every: Annotated[int, Field(ge=1, le=100000)] | None = None  # None: about 50 updates over the ramp
    temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 0.5
    regularization: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    score_lr: Annotated[float, Field(gt=0.0, le=10.0)] = 1e-2

    @model_validator(mode="after")
    def _window(self):
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) must be >= start ({self.start})")
        if getattr(self, "layer_sparsity", None) and self.scope != "layer":
            raise ValueError("layer_sparsity needs scope: layer (a global budget has no per-layer targets)")
        return self


class PruneUnstructured(MaskSchedule):
    type: Literal["prune_unstructured"]
    # None: set by the allocator of a size target (target: {size_kb | ratio}), required otherwise
    sparsity: Annotated[float, Field(ge=0.0, le=0.999)] | None = None
    criterion: Literal["magnitude", "learned"] = "magnitude"
    min_keep: Fraction = 0.01
    embeddings: bool = False  # also nn.Embedding tables (rows as channels); off: they are not pruned
    # per-layer targets (layer name -> sparsity), e.g. from a size-target allocator; needs scope: layer
    layer_sparsity: dict[str, Annotated[float, Field(ge=0.0, le=0.999)]] | None = None


class PruneStructured(MaskSchedule):
    type: Literal["prune_structured"]
    # None: set by the allocator of a latency target (target: {latency_ms | speedup}), required otherwise
    sparsity: Annotated[float, Field(ge=0.0, le=0.99)] | None = None
    criterion: Literal["magnitude", "learned"] = "learned"
    min_keep: Fraction = 0.05
    # per-group targets (root layer name -> channel sparsity), e.g. from a latency allocator
    layer_sparsity: dict[str, Annotated[float, Field(ge=0.0, le=0.99)]] | None = None


class QuantLSQ(Selection):
    type: Literal["quant_lsq"]
    bits: Annotated[int, Field(ge=2, le=8)] = 4
    per_channel: bool = True
    activations: bool = False
    act_bits: Annotated[int, Field(ge=2, le=8)] = 8
    start: Fraction = 0.0
    regularization: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    step_lr: Annotated[float, Field(gt=0.0, le=10.0)] = 1e-3
    # also nn.Embedding tables (a step per row, as a Linear has per output channel); off: stored as they are
    embeddings: bool = False
    # per-layer bit-widths (layer name -> bits), e.g. from a size-target allocator
    layer_bits: dict[str, Annotated[int, Field(ge=2, le=8)]] | None = None
    # zero as a quantizer level: a learned per-channel dead zone prunes (techniques/zero_level.py)
    zero_level: bool = False
    learn_bits: bool = True  # with zero_level: learn each layer's bit-width in [min_bits, max_bits]
    # with zero_level: a kept weight's levels are +-1..+-2**(bits-1) (every code of `bits` is a non-zero level;
    # the artifact stores zero by position), not +-1..+-(2**(bits-1)-1): 4 levels at 2 bits, not 2. None: the
    # joint form's choice (on at 2 bits, joint_form.nonzero_by_default), off elsewhere; a field, not
    # model_fields_set, since a resolved recipe is re-read with every field set
    nonzero_grid: bool | None = None
    min_bits: Annotated[int, Field(ge=2, le=8)] = MIN_BITS
    max_bits: Annotated[int, Field(ge=2, le=8)] = MAX_BITS
    # learning rate of dead zones and bit-widths; None: set by size_budget so they can cross its window
    zero_level_lr: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    # how the artifact stores the step sizes and the biases of quantized layers; training uses exactly that.
    # Steps: fp16, or log8 (one byte each on the grid 2**(k/16)); auto = log8 when the run has a size
    # target (a byte per channel goes to the weights instead), else fp16 (stored_scale_format)
    scale_format: Literal["auto", "fp16", "log8"] = "auto"
    bias_format: Literal["fp16", "int", "fp32"] = "fp16"
    # normalization layers (affine weights, BatchNorm's running statistics): fp32 as they are, or
    # fp16 values trained as stored, at half the bytes (techniques/norm_storage.py); fp16_folded: fp16,
    # and each BatchNorm stored as its inference affine (a scale and a shift per channel, two tensors
    # instead of four: half fp16's bytes), evaluated as stored; auto = fp16 when the run has a size
    # target (every byte counts there), else fp32 (stored_norm_format)
    norm_format: Literal["auto", "fp32", "fp16", "fp16_folded"] = "auto"
    _sized_run: bool = PrivateAttr(default=False)  # the recipe holding it has a size target: what `auto` means
    # zero_level's quantizer in torch.compile'd kernels (same quantized weights, gradients to float
    # rounding; seconds to compile once): auto = for runs of 2000 steps or more (techniques/zero_level_compiled.py)
    compile: Literal["auto"] | bool = "auto"

    @property
    def stored_norm_format(self) -> str:
        """The format normalization layers are stored in, fp32, fp16 or fp16_folded: norm_format, with `auto` as the
        recipe holding this config resolved it (Recipe._auto_formats; fp32 for a config outside a recipe)."""
        if self.norm_format != "auto":
            return self.norm_format
        return "fp16" if self._sized_run else "fp32"

    @property
    def stored_scale_format(self) -> str:
        """The format step sizes are stored (and trained) in, fp16 or log8: scale_format, with `auto` as the
        recipe holding this config resolved it (log8 under a size target; fp16 for a config outside a recipe)."""
        if self.scale_format != "auto":
            return self.scale_format
        return "log8" if self._sized_run else "fp16"

    @property
    def norms_in_fp16(self) -> bool:
        """Whether normalization layers train and are stored on fp16 values (fp16, fp16_folded)."""
        return self.stored_norm_format in ("fp16", "fp16_folded")

    @model_validator(mode="after")
    def _bit_range(self):
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits ({self.min_bits}) must be <= max_bits ({self.max_bits})")
        if self.zero_level and not self.min_bits <= self.bits <= self.max_bits:
            raise ValueError(f"bits ({self.bits}) must lie in [min_bits, max_bits] = [{self.min_bits}, {self.max_bits}]")
        if not self.zero_level and (self.min_bits, self.max_bits) != (MIN_BITS, MAX_BITS):
            raise ValueError(
                f"min_bits/max_bits ({self.min_bits}, {self.max_bits}) bound learned bit-widths, which only the dead-zone "
                f"quantizer learns; without zero_level: true every layer is stored at bits ({self.bits}). Add zero_level: "
                "true and size_budget (docs/joint.md, learned bit-widths), or remove min_bits and max_bits")
        widest = self.max_bits if self.zero_level and self.learn_bits else self.bits  # the joint form fixes widths
        if self.nonzero_grid and widest > 7:
            what = f"max_bits {self.max_bits} (widths learned)" if widest != self.bits else f"bits {self.bits}"
            fix = ("learn_bits: false (widths fixed at bits), or max_bits: 7 or less" if widest != self.bits
                   else "bits: 7 or less")
            raise ValueError(f"nonzero_grid: true needs widths of at most 7 bits, not {what}: its 8-bit level 128 "
                             f"fits no int8; set {fix}")
        # act_bits away from its default (not model_fields_set: a resolved recipe is re-read with every field set)
        if self.act_bits != 8 and not self.activations:
            warnings.warn(f"quant_lsq.act_bits: {self.act_bits} does nothing without activations: true (the layers' "
                          "inputs stay fp32); add activations: true, or remove act_bits", stacklevel=1)  # pydantic's frame is above
        return self


def paced_window(decide_steps: int, total_steps: int, start: float = 0.0) -> dict[str, float]:
    """size_budget's `end` and `freeze` for a decision window of about `decide_steps` steps from its
    `start`: the budget reaches the target after them (between 20% and 60% of the run) and the pattern
    freezes half a window later (at most at 80%), so a longer run spends its extra steps fine-tuning.
    Counted from `start`, not from step 0: a budget that starts after prune_structured's channels
    (joint_form) would otherwise get no window at all in a long run (end = 0.2 = its start)."""
    end = round(min(0.6, max(0.2, start + decide_steps / max(1, total_steps))), 4)
    return {"end": end, "freeze": round(min(0.8, 1.5 * end - 0.5 * start), 4)}  # half a window after `end`


class SizeBudget(Strict):
    """The artifact's bytes as a constraint inside training (techniques/size_budget.py).

    Needs `target` (size_kb or ratio) and quant_lsq with zero_level: true. The budget warms up
    from the model's size at `start` to the target at `end` (fractions of the run); at `freeze`
    the zero pattern and bit-widths are fixed and the rest of the run fine-tunes values.
    """

    type: Literal["size_budget"]
    start: Fraction = 0.0
    end: Fraction = 0.6
    freeze: Fraction = 0.8
    # dual ascent step of the multiplier; None: 50 / the window's steps (at least a tenth of the run)
    lambda_lr: Annotated[float, Field(gt=0.0, le=100.0)] | None = None
    penalty: Annotated[float, Field(ge=0.0, le=1000.0)] = 1.0  # quadratic term of the augmented Lagrangian
    margin: Annotated[float, Field(ge=0.0, le=0.2)] = 0.01  # aim this far under the target
    calibrate_every: Annotated[int, Field(ge=1, le=1_000_000)] | None = None  # None: 40 times a run
    target_bytes: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None  # set from `target` by compress()
    # weight of the second-order (Fisher, Optimal Brain Damage) cost of the weights a dead zone
    # prunes, added to the dead zones' first-order gradient; 0 = off (techniques/saliency.py)
    saliency: Annotated[float, Field(ge=0.0, le=1e6)] = 0.0
    # price: that cost resists pruning, weighed against the size term's price per byte; rank: only its
    # part that moves pruning between channels at constant bytes is kept (the budget alone sets how
    # much is pruned, the Fisher cost where), so the multiplier need not climb to outbid it; landing:
    # nothing on the dead zones, the Fisher estimate only orders the landing's cuts (landing_order: fisher)
    saliency_mode: Literal["price", "rank", "landing"] = "price"
    # the fine-tuning after `freeze` gets its own cosine LR phase from the full rate (plan.py)
    finetune_phase: bool = False
    # how the budget warms up over [start, end] in log-bytes: linear, or cubic (fast first, slow at the end)
    schedule: Literal["log_linear", "cubic"] = "log_linear"
    # while the state is under the budget, a positive multiplier also decays (e-fold in a tenth of the
    # window), so the integral of the descent's error stops pushing the state under the aim
    anti_windup: bool = False
    # the order of the landing's cuts before and at the freeze (catch-up, projection): a kept weight's margin
    # to the dead zone's edge per byte it frees, or (fisher; needs saliency > 0) the Fisher cost of removing
    # it per byte; the trim after the freeze keeps the margin (size_projection.Landing.drops_by_fisher)
    landing_order: Literal["margin", "fisher"] = "margin"
    # a decision window in steps, not in fractions of the run: the budget reaches the target after about
    # this many steps (end = decide_steps / the run's steps, between 0.2 and 0.6) and the pattern freezes
    # half a window later (at most at 0.8), so a longer run spends its extra steps fine-tuning a fixed
    # pattern (docs/joint.md); None: `end` and `freeze` as given
    decide_steps: Annotated[int, Field(ge=1)] | None = None
    # inside the decision window, a state found more than this share over the budget's goal at a
    # calibration is cut back to that bound (in the landing's order), so it follows the schedule instead of
    # piling the excess up for the catch-up before the freeze; None: only the catch-up (size_projection.track)
    lag_tolerance: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    # how the bytes are split across layers: learned (one constraint on the file, training moves bytes to the
    # layers that pay most) or erk (besides it, each layer's bytes stay within a factor `layer_band` of its ERK
    # share of the budget, the allocator's data-free split, by a multiplier per bound; techniques/layer_split.py)
    layer_split: Literal["learned", "erk"] = "learned"
    layer_band: Annotated[float, Field(ge=1.0, le=100.0)] = 2.0

    def paced(self, total_steps: int) -> dict[str, float]:
        """`end` and `freeze` for a run of `total_steps` steps under `decide_steps`."""
        return paced_window(self.decide_steps, total_steps, self.start)

    def freeze_step(self, window_end: int, total_steps: int) -> int:
        """The step of the freeze: `freeze` of the run, not before the window's end, before the last step."""
        return max(window_end, min(total_steps - 1, round(self.freeze * total_steps)))

    @model_validator(mode="after")
    def _window(self):
        if self.decide_steps is not None and self.start > 0.2:
            raise ValueError(f"decide_steps paces `end` from 0.2 of the run on, but start is {self.start}; "
                             "set start <= 0.2 or drop decide_steps")
        if not self.start <= self.end <= self.freeze:
            raise ValueError(f"need start <= end <= freeze, got {self.start}, {self.end}, {self.freeze}")
        if self.saliency > 0 and self.start >= self.freeze:
            raise ValueError(f"saliency ({self.saliency}) weighs the dead zones' decisions, which are fixed at freeze; "
                             f"with start ({self.start}) >= freeze ({self.freeze}) nothing is decided: set saliency: 0 "
                             "or start the budget before freeze")
        if self.saliency_mode != "price" and self.saliency <= 0:
            raise ValueError(f"saliency_mode: {self.saliency_mode} changes what the Fisher saliency does, but saliency "
                             "is 0; set saliency > 0 (e.g. 30) or saliency_mode: price")
        if self.landing_order == "fisher" and self.saliency <= 0:
            raise ValueError("landing_order: fisher ranks the landing's cuts by the Fisher cost the saliency estimates, "
                             "but saliency is 0; set saliency > 0 (e.g. 30) or landing_order: margin")
        if self.layer_band != 2.0 and self.layer_split == "learned":  # away from its default: it would do nothing
            raise ValueError(f"layer_band ({self.layer_band:g}) bounds each layer's bytes around its ERK share, which only "
                             "layer_split: erk does; add layer_split: erk, or remove layer_band")
        if self.finetune_phase and self.freeze >= 1.0:
            raise ValueError("finetune_phase: true gives the steps after freeze their own LR phase, but freeze is 1.0 "
                             "(no steps after it); set freeze below 1.0 (default 0.8) or finetune_phase: false")
        return self


class FeaturePair(Strict):
    """Match the output of a student module to a teacher module (hidden states, feature maps)."""

    student: str = Field(min_length=1)
    teacher: str = Field(min_length=1)
    weight: Annotated[float, Field(ge=0.0, le=1000.0)] = 1.0
    loss: Literal["mse", "cosine"] = "mse"  # cosine: 1 - cos over the feature axis (DistilBERT's hidden loss)


class DistillKD(Strict):
    type: Literal["distill_kd"]
    temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 4.0
    alpha: Fraction = 0.7
    features: list[FeaturePair] = Field(default_factory=list)
    cache_teacher: bool = False

    @model_validator(mode="after")
    def _distils_something(self):
        """alpha 0 weighs the logits' KL at nothing: without features the technique ran the teacher on every
        step for a loss of zero, and the run was plain training under another name."""
        if self.alpha == 0 and not self.features:
            raise ValueError("alpha: 0 without features distils nothing (the logits' KL weighs 0, and no hidden states "
                             "are matched); raise alpha, add features pairs, or remove distill_kd")
        return self


class _PruneUnits(Strict):
    """Heads / FFN neurons of a Hugging Face transformer (jointcompress.hf): see prune_units.py."""

    sparsity: Annotated[float, Field(ge=0.0, le=0.99)]  # fraction of the units removed
    start: Fraction = 0.0
    end: Fraction = 0.6
    temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    score_lr: Annotated[float, Field(gt=0.0, le=10.0)] = 2e-2
    per_layer: bool = False  # same fraction in every layer instead of one global top-k
    min_keep: Fraction = 0.0  # at least this fraction (and always >= 1 unit) kept in every layer
    init: Literal["magnitude", "constant"] = "magnitude"

    @model_validator(mode="after")
    def _window(self):
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) must be >= start ({self.start})")
        return self


class PruneHeads(_PruneUnits):
    type: Literal["prune_heads"]


class PruneFFN(_PruneUnits):
    type: Literal["prune_ffn"]


class PruneLayers(_PruneUnits):
    """Whole transformer layers: one global top-k over the layers (min_keep: fraction kept)."""

    type: Literal["prune_layers"]
    # initial scores: how far the predictions move when each layer is skipped, on the first training batch
    # (hf.layers.layer_output_change; a weight norm where there is no batch), or the weight norm, or constant
    init: Literal["output", "magnitude", "constant"] = "output"

    @model_validator(mode="after")
    def _global(self):
        if self.per_layer:
            raise ValueError("per_layer does not apply to prune_layers (there is one gate per layer); remove it")
        return self


class PruneBlocks(Strict):
    """Whole residual blocks of a CNN (module names), faded into the identity over [start, end]
    and removed by finalize: see techniques/prune_blocks.py."""

    type: Literal["prune_blocks"]
    blocks: list[str] = Field(min_length=1)
    start: Fraction = 0.0
    end: Fraction = 0.5

    @model_validator(mode="after")
    def _window(self):
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) must be >= start ({self.start})")
        if len(set(self.blocks)) != len(self.blocks):
            raise ValueError("blocks: a block is listed twice; list each once")
        return self


class RaiseStride(Strict):
    """A convolution's stride raised (default: the first stride-1 convolution, the stem), so every
    later map is smaller: see techniques/raise_stride.py and strides.py."""

    type: Literal["raise_stride"]
    layer: str | None = None  # a module name as model.named_modules() lists it (None: the first stride-1 conv)
    stride: Annotated[int, Field(ge=2, le=8)] = 2


class HF(Strict):
    """Hugging Face text classification (`jointcompress compress` dispatches to jointcompress.hf)."""

    model_name_or_path: str | None = None  # the teacher: a fine-tuned folder (CLI --weights overrides)
    student_layers: list[Annotated[int, Field(ge=0)]] | None = None  # teacher layers the student keeps, in order
    max_length: Annotated[int, Field(ge=8, le=4096)] = 64
    train_limit: Annotated[int, Field(ge=1)] | None = None  # random subset of train rows (None: all)
    eval_limit: Annotated[int, Field(ge=1)] | None = None  # first rows of dev (None: all)
    # the classes' names in index order; None: the teacher's own (its config's id2label) where it has a
    # classification head, else NEGATIVE / POSITIVE (a base encoder such as minilm-l6 gets a 2-class head)
    labels: list[str] | None = Field(default=None, min_length=2)
    # the data's text column (None: a sentence pair's columns by name, premise / hypothesis, ..., else
    # "sentence", else "text") and a pair's second text's column (hf/data.py)
    text_column: str | None = None
    pair_column: str | None = None
    label_column: str = "label"  # the data's label column: class indices, or names from `labels`
    # the column names of .tsv / .csv files without a header row (GLUE's CoLA: [source, label, mark,
    # sentence]); None: the first row names them
    columns: list[str] | None = Field(default=None, min_length=2)
    trim_vocab: bool = False  # keep only the word pieces the training text uses (embeddings + tokenizer)
    ptq_bits: Annotated[int, Field(ge=2, le=8)] | None = 8  # artifact: weights LSQ did not train (embeddings, pooler)

    @field_validator("student_layers")
    @classmethod
    def _in_order(cls, layers):
        """[2, 0] built a student whose layers ran in reverse, without a word; [] kept every layer."""
        if layers is not None and not layers:
            raise ValueError("[] keeps no layer: list the teacher layers the student keeps (at least one), or leave "
                             "student_layers out to keep them all")
        if layers is not None and any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"{layers}: list the teacher layers the student keeps once each, in increasing order "
                             f"(it runs them in the teacher's order): {sorted(set(layers))}")
        return layers


Technique = Annotated[
    Union[PruneUnstructured, PruneStructured, QuantLSQ, DistillKD, PruneHeads, PruneFFN, PruneLayers, PruneBlocks,
          SizeBudget, RaiseStride], Field(discriminator="type")
]
# every technique's `type`, in the union's order (named by a recipe error)
TECHNIQUE_TYPES = tuple(get_args(c.model_fields["type"].annotation)[0] for c in get_args(get_args(Technique)[0]))


class Target(Strict):
    """What the user wants, in their units; the allocator turns it into per-layer budgets."""

    size_kb: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None  # artifact weight bytes / 1024
    ratio: Annotated[float, Field(gt=1.0, le=10000.0)] | None = None  # vs the model's fp32 safetensors file, header in
    latency_ms: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    # times faster than the uncompressed model in PyTorch fp32 at `batch`, both timed when the run
    # starts on this machine: a latency target that a loaded machine reads as it reads the model
    speedup: Annotated[float, Field(gt=1.0, le=10000.0)] | None = None
    batch: Annotated[int, Field(ge=1, le=100000)] = 1
    # size targets: at 80% of the pruning ramp and at 90% of the run, re-fit the per-layer sparsity
    # from the trained weights and step sizes so that the artifact lands on the target
    # (targets.SizeSteering)
    steer: bool = True
    # sequential and overlap at low bits: once LSQ first rounds the masked weights, re-fit masks whose file would land
    # more than 5% under the target, letting weights back in (targets.SizeSteering); false keeps the masks fixed
    # there (the file may then land under the target)
    refit_on_rounding: bool = True
    # how a size target's bytes are shared among the layers (modes sequential and overlap; mode: joint learns
    # its own): erk, the ERK proxy (from the shapes alone); sensitivity, a scan of the model before training
    # (each layer pruned and rounded alone, read with the run's evaluate): the layers whose metric drops most
    # keep more weights and bits (targets.resolve_target)
    allocator: Literal["erk", "sensitivity"] = "erk"
    # set by the allocator once it has written the per-layer budgets into the techniques;
    # compress() then does not allocate again (only steers)
    allocated: bool = False

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("size_kb", "ratio", "latency_ms", "speedup") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of size_kb, ratio, latency_ms, speedup (got {given or 'none'})")
        return self

    @property
    def is_latency(self) -> bool:
        """A latency target (latency_ms or speedup): channel widths, not bytes."""
        return self.latency_ms is not None or self.speedup is not None


LOWER_IS_BETTER = frozenset({"loss", "error", "err", "perplexity", "ppl", "wer", "cer", "mse", "mae", "rmse", "nll"})
# words of a metric's name that turn its direction: a change of the quantity, or its negation
GAIN_WORDS = frozenset({"improvement", "gain"})
FALL_WORDS = frozenset({"reduction", "decrease"})
NEGATED = frozenset({"neg", "negative", "minus"})


def _lower_word(word: str) -> bool:
    return word in LOWER_IS_BETTER or word.endswith("loss")


def _rises_by_name(metric: str) -> bool:
    """False for a name with a word that says lower is better (eval_loss, error_rate, perplexity, wer), else
    True; turned by a word of change (loss_reduction and loss_improvement rise) and by a negation before
    such a word (scikit-learn's neg_mean_squared_error, val_neg_log_loss; not neg_f1, the negative class's F1)."""
    words = [w for w in re.split(r"[^a-z0-9]+", metric.lower()) if w]
    lower = [i for i, w in enumerate(words) if _lower_word(w)]
    if set(words) & GAIN_WORDS:  # loss_improvement, mse_gain: the better, the higher
        return True
    rises = not lower
    if set(words) & FALL_WORDS:  # loss_reduction: higher is better
        rises = not rises
    negated = any(w in NEGATED and any(j > i for j in lower) for i, w in enumerate(words))
    return not rises if negated else rises


class Training(Strict):
    epochs: Annotated[int, Field(ge=1, le=100000)] = 10
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 1e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 128
    # gradient accumulation: each batch of batch_size samples forwarded in this many parts, one optimizer step
    # (the same update, in 1/micro_batches of the activation memory; training/micro_batches.py)
    micro_batches: Annotated[int, Field(ge=1, le=65_536)] = 1
    # the training forward in bfloat16 or float16 autocast (fp16 with a loss scaler); weights, gradients,
    # optimizer and evaluation stay float32 (training/mixed_precision.py)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    metric: str = "accuracy"
    # whether a higher `metric` is better (the kept epoch, the sensitivity scan's drops); None: inferred from
    # its name, lower for a loss, error, perplexity, WER/CER, MSE/MAE (as transformers' Trainer reads "loss"),
    # turned by a negation before such a word (scikit-learn's neg_mse) or a word of change (loss_reduction)
    greater_is_better: bool | None = None
    grad_clip: Annotated[float, Field(ge=0.0, le=1e6)] = 0.0
    # which evaluated state (every technique at its target) the run ends with: the best by `metric`, or the
    # last (no choice made on the evaluation data: when `evaluate` reads the test split the result is
    # reported on, "best" is the best of several test readings, and a method at its target for more
    # epochs gets more of them; compare --keep last gives every variant the same rule)
    keep: Literal["best", "last"] = "best"
    # training images held out (a fixed draw) as the evaluation the run's choices read (the kept epoch, the
    # teacher's best), so the test split is only reported on; read where the evaluation is built from a data
    # set (the command line, compare, pipeline.compress_and_save; an hf recipe holds out rows of its training
    # file, its dev file then only reported on); compress() in Python evaluates with the `evaluate` it is
    # given, and warns that it held nothing out. 0: choices read the test split (the dev file)
    validation_images: Annotated[int, Field(ge=0, le=100_000_000)] = 0
    # training batches over which BatchNorm's running statistics are re-estimated before each evaluation,
    # for the weights as they are then (quantized weights flip between grid points and masks move at once
    # faster than the running averages follow; session/norm_statistics.py). 0: the averages training left
    recalibrate_norms: Annotated[int, Field(ge=0, le=100_000)] = 16

    @model_validator(mode="after")
    def _parts_hold_samples(self):
        """More micro-batches than samples in a batch leave parts of no sample (a run was accepted without a
        word)."""
        if self.micro_batches > self.batch_size:
            raise ValueError(f"micro_batches ({self.micro_batches}) is more than batch_size ({self.batch_size}): each part "
                             "needs a sample; use at most batch_size micro_batches (a larger batch_size takes more)")
        return self

    def metric_rises(self) -> bool:
        """Whether a higher `metric` is better: `greater_is_better`, else read from its name
        (_rises_by_name). A loss read as higher-is-better kept the worst epoch without a word."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return _rises_by_name(self.metric)


class Coordination(Strict):
    """How the loss terms' gradients are combined (coordination.py). `accuracy_as_one` (default): task
    and distillation enter the measured steps as one accuracy gradient, so `pcgrad` and `scale`
    resolve accuracy against the other terms (size, regularizers) only, the conflict the joint mode
    is built around, with one backward fewer per measured step; false: each term is its own gradient
    (the setting of the stored `*-pcgrad` / `*-scale` results; benchmarks/compare_mnist.py keeps it)."""

    strategy: Literal["none", "scale", "pcgrad"] = "none"
    # measure (one backward per term) and resolve on every k-th step; None: every step for scale and
    # pcgrad, and for none only the steps it logs (log_every): none changes no update, and measuring
    # takes one backward per term
    every: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    accuracy_as_one: bool = True
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3
    factor: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    log_every: Annotated[int, Field(ge=1, le=1_000_000)] = 50

    def measure_every(self) -> int:
        """The steps between measurements (`every`, or its default for the strategy)."""
        if self.every is not None:
            return self.every
        return self.log_every if self.strategy == "none" else 1


class Sequential(Strict):
    """How the same epochs are split when techniques run one after another.

    prune -> fine-tune -> quantize (QAT) -> fine-tune; the four fractions sum to 1.
    """

    prune: Fraction = 0.4
    finetune_after_prune: Fraction = 0.1
    quantize: Fraction = 0.4
    finetune_after_quantize: Fraction = 0.1

    @model_validator(mode="after")
    def _sum(self):
        total = self.prune + self.finetune_after_prune + self.quantize + self.finetune_after_quantize
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"the four phase fractions must sum to 1, they sum to {total:.4f}")
        return self


class Recipe(Strict):
    version: Literal[1] = 1
    name: str = "recipe"
    # joint: techniques trained together (under a size target: zero as a quantizer level under one size
    # budget, joint_form.py); overlap: masks and LSQ at overlapping times, under a size target with the
    # allocator's per-layer budgets; sequential: prune -> fine-tune -> quantize -> fine-tune
    mode: Literal["joint", "overlap", "sequential"] = "joint"
    model: str | None = None  # a reference model name for the CLI (lenet300, lenet5, resnet, mobilenet, seqcnn, vit, lstm)
    data: str | None = None  # "digits" (embedded) or a path to an MNIST-style .npz
    # how the data file's values become the model's inputs (data.INPUT_FORMS): standardised with the training
    # split's mean and std; unit_range, uint8 pixels / 255 (as many training scripts feed images); as_stored. A
    # model given with --weights must get the form it was trained on
    inputs: Literal["standardised", "unit_range", "as_stored"] = "standardised"
    techniques: list[Technique] = Field(default_factory=list)
    training: Training = Field(default_factory=Training)
    coordination: Coordination = Field(default_factory=Coordination)
    sequential: Sequential = Field(default_factory=Sequential)
    target: Target | None = None
    hf: HF | None = None  # Hugging Face text classification; see docs/transformers.md
    # how the target was resolved, for the run's history (latency_targets.resolve_latency: the allocator's
    # own timing and verdict); not part of the recipe, so not dumped, compared or checkpointed
    _resolution: dict | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _combinations(self):
        kinds = [t.type for t in self.techniques]
        for k in set(kinds):
            if kinds.count(k) > 1 and k in ("quant_lsq", "distill_kd", "prune_heads", "prune_ffn", "prune_layers", "prune_blocks",
                                            "size_budget", "prune_structured", "raise_stride"):
                # prune_structured: a second entry traced a model the first had already reparametrized, and crashed
                per_group = "; per-group sparsities go in its layer_sparsity" if k == "prune_structured" else ""
                where = ", ".join(f"techniques.{i}" for i, kind in enumerate(kinds) if kind == k)
                raise ValueError(f"technique '{k}' appears {kinds.count(k)} times ({where}); use it once{per_group}")
        return self

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value):
        """`version: "1"` (quoted in YAML, or from JSON) was refused where every other number given as text is taken."""
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @model_validator(mode="after")
    def _inputs_of_a_data_file(self):
        """`inputs` says how an .npz's (or digits') values are fed; a transformers recipe tokenises text."""
        if self.hf is not None and self.inputs != "standardised":
            raise ValueError(f"inputs: {self.inputs} sets how an .npz's values become inputs; a recipe with an hf: "
                             "section tokenises its text itself: remove inputs")
        return self

    @model_validator(mode="after")
    def _nonzero_grid_has_its_quantizer(self):
        """nonzero_grid sets the dead-zone quantizer's levels: zero_level, or the joint form (mode: joint under a
        size target), which turns it on."""
        quant = self.technique("quant_lsq")
        joint_form = self.mode == "joint" and self.target is not None and not self.target.is_latency
        if quant is not None and quant.nonzero_grid and not quant.zero_level and not joint_form:
            raise ValueError("quant_lsq.nonzero_grid: true sets the levels of the dead-zone quantizer's kept weights; "
                             "add zero_level: true with learn_bits: false (widths fixed at bits; learned widths reach "
                             "max_bits 8, which the grid cannot hold), or run mode: joint under a size target, whose "
                             "joint form has both, or remove nonzero_grid")
        return self

    def _warn_widths_unpriced(self) -> None:
        """Learned widths (zero_level, learn_bits on) with no size_budget: nothing prices a layer's bits, so every
        layer stayed at quant_lsq.bits, as asked to learn them, without a word (the joint form under a size target
        adds the budget and says what it does with the widths itself)."""
        quant = self.technique("quant_lsq")
        if quant is None or not (quant.zero_level and quant.learn_bits and quant.min_bits < quant.max_bits):
            return
        if self.mode == "joint" and self.target is not None and not self.target.is_latency:
            return
        warnings.warn(f"quant_lsq.learn_bits: widths are learned against size_budget's bytes; without size_budget "
                      f"nothing prices a layer's bits and every layer stays at bits ({quant.bits}). Add size_budget "
                      "(with a target: docs/joint.md), or set learn_bits: false", UserWarning, stacklevel=1)

    @model_validator(mode="after")
    def _one_model(self):
        """`model:` and `hf:` name two models; the command line took the hf path and ignored `model:` unsaid."""
        if self.hf is not None and self.model is not None and self.model.startswith("hf:"):
            raise ValueError(f"model: {self.model!r} and the hf: section both name the Hugging Face model; put "
                             f"{self.model[3:]!r} in hf.model_name_or_path (or pass it as --weights) and remove model:")
        if self.hf is not None and self.model is not None:
            raise ValueError(f"model: {self.model!r} names a reference model for the command line, and the hf: "
                             "section compresses a Hugging Face model (hf.model_name_or_path, or --weights); give "
                             "one: remove model:, or the hf: section")
        return self

    @model_validator(mode="after")
    def _sparsity_given(self):
        """A pruning technique's sparsity may be left out only where a target's allocator sets it:
        a size target sets prune_unstructured's, a latency target prune_structured's."""
        for i, t in enumerate(self.techniques):
            if t.type not in ("prune_unstructured", "prune_structured") or t.sparsity is not None:
                continue
            latency = t.type == "prune_structured"
            if self.target is None or self.target.is_latency != latency:
                which = "{latency_ms: ...} or {speedup: ...}" if latency else "{size_kb: ...} or {ratio: ...}"
                alone = (" (layer_sparsity sets the layers it names; sparsity is the rest's: 0 prunes only those)"
                         if t.layer_sparsity else "")
                raise ValueError(f"techniques.{i} ({t.type}): sparsity is required (the fraction to remove, e.g. 0.5) "
                                 f"unless target: {which} sets it{alone}")
        return self

    @model_validator(mode="after")
    def _structured_under_size(self):
        """Channel pruning beside a size target: in mode joint the size budget measures the file with the
        masked channels removed and lands the rest of the bytes on the target; the allocator of the other
        modes does not price removed channels. Refused there, before any training."""
        sized = (self.target is not None and not self.target.is_latency) or self.technique("size_budget") is not None
        if sized and self.mode != "joint" and self.technique("prune_structured") is not None:
            i = next(i for i, t in enumerate(self.techniques) if t.type == "prune_structured")
            raise ValueError(f"techniques.{i} (prune_structured) cannot be combined with a size target in mode "
                             f"{self.mode} (target.size_kb / target.ratio, or size_budget): its allocator decides "
                             "unstructured sparsity and bits and does not price removed channels. Use mode: joint, "
                             "whose size budget measures the file with the channels removed and lands the rest on the "
                             "target; or remove the size target and use target: {latency_ms: ...} or {speedup: ...}, "
                             "which allocates channel sparsity for speed; or compress in two runs: prune_structured "
                             "first (finalize removes the channels), then the size target on the smaller model "
                             "(target.size_kb: a ratio would be of the pruned model's size; on the command line, "
                             "--weights FIRST_RUN/artifact)")
        return self

    @model_validator(mode="after")
    def _joint_form_selection(self):
        """Under a size target, mode: joint prunes through quant_lsq's dead zones (joint_form.py), so
        on the layers quant_lsq selects: a prune_unstructured that selects others would be ignored."""
        prune = self.technique("prune_unstructured")
        if prune is None or not self.asks_for_joint_form():
            return self
        quant = self.technique("quant_lsq")
        chosen = (quant.targets, quant.exclude, quant.embeddings) if quant is not None else (["*"], [], False)
        if (prune.targets, prune.exclude, prune.embeddings) != chosen:
            raise ValueError(
                f"mode: joint under a size target prunes through quant_lsq's dead zones, on the layers quant_lsq "
                f"quantizes (targets {chosen[0]}, exclude {chosen[1]}, embeddings {chosen[2]}), but prune_unstructured "
                f"selects others (targets {prune.targets}, exclude {prune.exclude}, embeddings {prune.embeddings}). "
                "Give both the same targets / exclude / embeddings, or set mode: overlap (magnitude masks on "
                "prune_unstructured's layers under the allocator's budgets)")
        return self

    @model_validator(mode="after")
    def _size_budget(self):
        if self.technique("size_budget") is None:
            self._warn_widths_unpriced()
            return self
        quant = self.technique("quant_lsq")
        if quant is None or not quant.zero_level:
            raise ValueError("size_budget needs quant_lsq with zero_level: true (the dead zone is what it steers)")
        if self.mode != "joint":
            raise ValueError("size_budget trains pruning and bits together, so it needs mode: joint; "
                             "sequential runs meet a size target through the allocator (remove size_budget)")
        if self.technique("prune_unstructured") is not None:
            raise ValueError("size_budget prunes through quant_lsq's dead zone; remove prune_unstructured")
        budget = self.technique("size_budget")
        if (self.target is None or self.target.is_latency) and budget.target_bytes is None:
            raise ValueError("size_budget needs target: {size_kb: ...} or {ratio: ...}")
        if self.target is not None and not self.target.is_latency and not self.target.allocated \
                and budget.target_bytes is not None:  # the target's bytes replaced it without a word
            warnings.warn(f"size_budget.target_bytes ({budget.target_bytes:g}) beside target: the target's bytes replace "
                          "it (size_kb, or ratio against the fp32 file; in compare, each of --ratios); give one",
                          UserWarning, stacklevel=1)  # pydantic's frame is above
        return self

    @model_validator(mode="after")
    def _auto_formats(self):
        """quant_lsq's `auto` formats under a size target, where every fixed byte is taken from the weights:
        norm_format fp16 (fp32 normalization layers were half the small ResNet's file at 30x) and
        scale_format log8 (fp16 step sizes were a quarter of LeNet-5's file at 400x). Kept as `auto` in
        the recipe, so a copy given another target resolves them again."""
        quant = self.technique("quant_lsq")
        if quant is not None:
            quant._sized_run = self.has_size_target()
        return self

    def has_size_target(self) -> bool:
        """A target in bytes: target.size_kb / ratio, or size_budget.target_bytes."""
        budget = self.technique("size_budget")
        return (self.target is not None and not self.target.is_latency) or (
            budget is not None and budget.target_bytes is not None)

    def technique(self, kind: str):
        return next((t for t in self.techniques if t.type == kind), None)

    def without_target(self) -> "Recipe":
        """This recipe with no target, for a run whose target is already met by what it sets (the hf
        plan's sparsities): quant_lsq's `auto` formats are written out as the target resolved them, so
        the copy (and a run resumed from its dump) trains and stores what the plan measured."""
        pinned = [t.model_copy(update={"scale_format": t.stored_scale_format, "norm_format": t.stored_norm_format})
                  if t.type == "quant_lsq" else t for t in self.techniques]
        return parse_recipe({**self.model_dump(), "techniques": [t.model_dump() for t in pinned], "target": None})

    def asks_for_joint_form(self) -> bool:
        """mode: joint under a size_kb / ratio target not yet allocated, without size_budget spelled out:
        compress() trains the joint form (joint_form.py)."""
        target = self.target
        return (self.mode == "joint" and target is not None and not target.is_latency and not target.allocated
                and self.technique("size_budget") is None)


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(e["loc"][-1]), _fields_at(e["loc"][:-1]), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            anchors = "; a block of YAML anchors goes under a top-level key starting with x-" if len(e["loc"]) == 1 else ""
            lines.append(f"  - {loc}: unknown key{hint}; remove it or check its spelling{anchors}")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            lines.append(f"  - {loc}: {_technique_type_error(e)}")
        else:
            # the input once: not where the message quotes it already, nor the whole entry or recipe a model check read
            shown = "input" in e and e["loc"] and not isinstance(got, dict) and "(got " not in msg
            lines.append(f"  - {loc}: {msg} (got {got!r})" if shown else f"  - {loc}: {msg}")
    return "\n".join(lines)


def _fields_at(loc: tuple) -> list[str]:
    """The keys of the recipe section `loc` names (a technique by its type tag): what an unknown key is compared
    with for a likely spelling ("hf.max_lenght" said nothing of max_length). Empty where `loc` names no section."""
    cls: Any = Recipe
    for part in loc:
        if isinstance(part, int):  # a list's item: the section is the list's
            continue
        if part in TECHNIQUE_TYPES:
            cls = get_args(get_args(Technique)[0])[TECHNIQUE_TYPES.index(part)]  # TECHNIQUE_TYPES is in the union's order
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        cls = _section_class(field.annotation) if field is not None else None
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}))


def _section_class(annotation) -> Any:
    """The pydantic model a field holds (through Optional, list and Annotated), or the technique union's marker."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if annotation is Technique:
        return Technique  # resolved by the next part of the location, the type tag
    for arg in get_args(annotation):
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def _technique_type_error(e: dict) -> str:
    """A technique's unknown or missing `type`, with the closest type where one is near: pydantic listed the tags
    and the line repeated them as 'Allowed types', with no word of the likely fix."""
    tag = (e.get("ctx") or {}).get("tag")
    listed = ", ".join(TECHNIQUE_TYPES)
    if e["type"] == "union_tag_not_found" or tag is None:
        return f"a technique without a type; give each one `type:`, one of {listed}"
    near = difflib.get_close_matches(str(tag), TECHNIQUE_TYPES, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown technique type {tag!r}{hint}; the types are {listed}"


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a dict (or a Recipe) and return a Recipe, or raise RecipeError naming the field."""
    if isinstance(data, Recipe):
        return data
    if isinstance(data, (str, os.PathLike)):
        raise RecipeError(f"invalid recipe ({source}): got the path {str(data)!r}; read the file first: "
                          "jointcompress.load_recipe(path)")
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe ({source}): expected a mapping of fields, got {type(data).__name__}")
    # top-level keys starting with x- are the author's (a block of YAML anchors, as Compose files keep them), not read
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format(err, source)) from None


def warn_unread_quant_start(recipe: Recipe) -> None:
    """mode: sequential starts quant_lsq at its quantize phase (after sequential.prune and
    finetune_after_prune); a quant_lsq.start the recipe set there was dropped without a word. Said where a
    run starts (compress, prepare), not on every parse: the package's own sequential copies of a joint
    recipe (compare's checks and variants, --mode sequential) drop or ignore it on purpose."""
    quant = recipe.technique("quant_lsq")
    if recipe.mode == "sequential" and quant is not None and quant.start != 0.0:
        at = recipe.sequential.prune + recipe.sequential.finetune_after_prune
        warnings.warn(f"quant_lsq.start ({quant.start:g}) is not read in mode: sequential, which starts LSQ at its "
                      f"quantize phase ({at:g} of the run: sequential.prune + sequential.finetune_after_prune); "
                      "move that phase with the sequential fractions, or remove quant_lsq.start",
                      UserWarning, stacklevel=3)


def warn_no_steps_after(recipe: Recipe) -> None:
    """A window that ends with the run (a pruning end of 1.0, quant_lsq.start 1.0): the masks reach their
    sparsity, or the quantizers attach, at the last step, and no step trains the weights that stay; a recipe
    so written ran to its end, its accuracy lost, without a word. Not in mode: sequential, whose phases place
    the windows."""
    if recipe.mode == "sequential":
        return
    late = [f"{t.type}.end {t.end:g}" for t in recipe.techniques
            if t.type in ("prune_unstructured", "prune_structured") and t.end >= 1.0 and (t.sparsity or 0) > 0]
    late += [f"quant_lsq.start {t.start:g}" for t in recipe.techniques if t.type == "quant_lsq" and t.start >= 1.0]
    if late:
        warnings.warn(f"{' and '.join(late)}: the masks reach their sparsity, or the quantizers attach, at the run's "
                      "last step, and no step after it trains the weights that stay; end the pruning window earlier "
                      "(its default end is 0.6) and start quant_lsq before the end (default 0.0)", UserWarning,
                      stacklevel=3)


def compresses_nothing(recipe: Recipe, student_is_copy: bool = False) -> str | None:
    """Why a run of `recipe` would train and compress nothing, or None. No technique and no target; or, where the
    student is a copy of the teacher (the command line's, not a smaller student of your own given to compress()),
    distillation alone without hf.student_layers: the file would be the teacher's size. Said where a run starts
    (compress, prepare, the CLI) and by `recipe validate`: a run went to its end, exit 0, at 1.0x."""
    if recipe.target is not None:  # the target adds what meets it
        return None
    kinds = {t.type for t in recipe.techniques}
    if not kinds:
        return ("techniques is empty, so the run trains and compresses nothing; list at least one (prune_unstructured, "
                "quant_lsq, ...) or set a target (size_kb, ratio)")
    if student_is_copy and kinds == {"distill_kd"} and not (recipe.hf is not None and recipe.hf.student_layers):
        return ("distill_kd is the only technique and the student is a copy of the teacher, so the artifact is the "
                "teacher's size; add prune_unstructured or quant_lsq, a target (size_kb, ratio)"
                + (", or hf.student_layers" if recipe.hf is not None else ""))
    return None


class CompressesNothing(UserWarning):
    """A run that trains and compresses nothing (compresses_nothing); train_baseline's, on purpose, is not said."""


def warn_compresses_nothing(recipe: Recipe, student_is_copy: bool = False) -> None:
    """compresses_nothing's reason as a warning (stacklevel: the caller of compress / prepare)."""
    reason = compresses_nothing(recipe, student_is_copy)
    if reason is not None:
        warnings.warn(reason, CompressesNothing, stacklevel=3)


def without_quant_start(data: dict) -> dict:
    """A recipe's data with quant_lsq's start removed, for a sequential run of a recipe written for joint runs
    (compare's sequential variant, --mode sequential): it starts LSQ at its quantize phase, so the start is not
    read there, and the user who set it for the joint runs is not told to remove it."""
    for technique in data.get("techniques", []):
        if technique.get("type") == "quant_lsq":
            technique.pop("start", None)
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing a key given twice in one mapping: the last one won, so a second `training:`
    block silently dropped the first's settings."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys the mapping's own ones override
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping (the second would replace the first); "
                    "merge them into one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_json(path: Path, text: str) -> None:
    """A .json recipe's syntax, in JSON's words: its error was reported as "not valid YAML" with PyYAML's flow
    mapping terms. (Read on with the YAML loader, which refuses a key given twice where json.loads keeps the last.)"""
    import json

    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise RecipeError(f"{path}: not valid JSON: {err}") from None


def load_recipe(path: str | Path, defaults: dict | None = None) -> Recipe:
    """Read a YAML recipe file; errors name the file, the field and the allowed values. `defaults`: top-level
    fields the file may leave out, set by the command (compare's target, from --ratios)."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder; give the recipe's YAML file (e.g. {path / 'recipe.yaml'}, or one of "
                          "src/jointcompress/recipes/)")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    with path.open("rb") as head:
        utf16 = head.read(2) in (b"\xff\xfe", b"\xfe\xff")  # what PowerShell's `>` and some editors write
    if utf16:
        raise RecipeError(f"{path}: is saved as UTF-16; save it as UTF-8 (in PowerShell: "
                          "Out-File -Encoding utf8, or Set-Content)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file (a data or weights file?); give the recipe's YAML file") from None
    if path.suffix.lower() == ".json":
        _check_json(path, text)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader: builds plain data only
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # PyYAML raises ValueError on impossible dates
        tabs = " (YAML indents with spaces, not tabs)" if "\t" in text else ""
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"  # a .json file's only YAML error: a key twice
        raise RecipeError(f"{path}: not valid {kind}{tabs}: {err}") from None
    if isinstance(data, (str, int, float, bool)):  # parse_recipe would read a string as a path given to it
        raise RecipeError(f"{path}: holds the single value {str(data)[:60]!r}, not a recipe: a mapping of fields "
                          "(version, model, techniques, training, ...); see src/jointcompress/recipes/ for examples")
    if data is None:  # an empty file, or comments only: it ran as the defaults, compressing nothing, without a word
        raise RecipeError(f"{path}: holds no recipe (the file is empty or comments only); write its fields "
                          "(techniques, training, ...): see src/jointcompress/recipes/ for examples")
    if defaults and isinstance(data, dict):
        data = {**defaults, **data}
    return parse_recipe(data, source=str(path))


def recipe_as_run(path: str | Path, recipe: Recipe, flags: dict[str, str | None]) -> str:
    """What a run folder's recipe.yaml holds: the recipe file as written (its comments kept) where no flag
    overrode it; else the recipe with the command line's `flags` applied (--mode, --model, --data, ...), so
    that re-running it runs the same experiment (a copy of the file said mode: joint of a --mode sequential run)."""
    text = Path(path).read_text(encoding="utf-8")
    given = {flag: value for flag, value in flags.items() if value is not None}
    if not given:
        return text
    data = recipe.model_dump(mode="json", exclude_unset=True)
    if given.get("--data") is not None:
        data["data"] = given["--data"] if given["--data"] == "digits" else str(Path(given["--data"]).resolve())
    said = ", ".join(f"{flag} {value}" for flag, value in given.items())
    return f"# {path} as this run read it, with {said} (the file itself is unchanged)\n" + yaml.safe_dump(data, sort_keys=False)


def builtin_recipe(name: str) -> Path:
    """Path of a recipe shipped with the package (src/jointcompress/recipes/NAME.yaml)."""
    path = Path(__file__).parent / "recipes" / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise RecipeError(f"no built-in recipe '{name}'; available: {', '.join(available)}")
    return path


# recipe fields that change memory and speed, not the run: a resumed run may set them anew (a run that ran out of
# memory resumes with more micro-batches, or in bf16), so checkpoints are matched without them
# recipe fields added since checkpoints were first written, with the value a run without them trained with:
# a checkpoint that lacks one resumes as that value, not as a different recipe
ADDED_FIELDS = {("training", "keep"): "best", ("training", "validation_images"): 0, ("training", "micro_batches"): 1,
                ("training", "precision"): "fp32", ("training", "greater_is_better"): None,
                ("training", "recalibrate_norms"): 0, ("target", "allocator"): "erk",
                ("target", "refit_on_rounding"): True}


# top-level recipe fields added since, likewise (a run without `inputs` read its data standardised)
ADDED_TOP_FIELDS = {"inputs": "standardised"}


def with_added_fields(saved: dict) -> dict:
    """A checkpoint's recipe dump with the fields added since it was written at what it trained with (None, a
    result that kept no recipe, as it is)."""
    if not saved:
        return saved
    saved = {**{field: value for field, value in ADDED_TOP_FIELDS.items() if field not in saved}, **saved}
    for (section, field), value in ADDED_FIELDS.items():
        if isinstance(saved.get(section), dict) and field not in saved[section]:
            saved = {**saved, section: {**saved[section], field: value}}
    return saved


# recalibrate_norms changes only the statistics evaluations read, not the weights a run trains: a run from
# before the field (0) resumes with today's default, re-estimating from its next evaluation on
MEMORY_FIELDS = (("training", "micro_batches"), ("training", "precision"), ("training", "recalibrate_norms"))


def without_memory_fields(dump: dict) -> dict:
    """A recipe's JSON dump without MEMORY_FIELDS: what a checkpoint's recipe must match; quant_lsq.nonzero_grid
    unset (None) read as false, which it means wherever it is left in a recipe (the joint form writes its choice),
    and which a checkpoint written before the field could be unset holds."""
    for section, field in MEMORY_FIELDS:
        if isinstance(dump.get(section), dict) and field in dump[section]:
            dump = {**dump, section: {k: v for k, v in dump[section].items() if k != field}}
    if isinstance(dump.get("techniques"), list):
        dump = {**dump, "techniques": [{**t, "nonzero_grid": False} if isinstance(t, dict) and t.get("type") == "quant_lsq"
                                       and t.get("nonzero_grid") is None else t for t in dump["techniques"]]}
    return dump

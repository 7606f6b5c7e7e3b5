"""Knowledge distillation from a frozen teacher (Hinton et al., 2015) plus feature losses.

Feature losses (`features`: student module -> teacher module, MSE or cosine, a learned
linear projection when the widths differ) match intermediate outputs, e.g. the hidden states
of a DistilBERT-style student layer and the teacher layer it was copied from.

`kd_loss` is alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) with `batchmean`, computed as
F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True): kl_div wants log-probabilities
as input and, with log_target, log-probabilities as target. The task term (1 - alpha) * CE is
the loop's, weighted through `task_weight`. The teacher runs in eval mode without gradients.
"""
from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DataError, RecipeError, TrainingError
from ..layer_types import BATCH_NORMS, CONVOLUTIONS
from ..model_call import call_model, evaluating
from ..model_copy import CopiedWithoutGraph
from .base import RunContext, Technique


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch; for token-level
    logits [batch, tokens, vocab], averaged over the real tokens (`token_mask`); for dense
    predictions [batch, classes, H, W(, D)], over the positions (`dense_kd_loss`)."""
    t = temperature
    if student_logits.dim() == 3:
        return token_kd_loss(student_logits, teacher_logits, t, token_mask)
    if student_logits.dim() > 3:
        return dense_kd_loss(student_logits, teacher_logits, t)
    return F.kl_div(log_probs(student_logits, t, -1), log_probs(teacher_logits.detach(), t, -1),
                    reduction="batchmean", log_target=True) * (t * t)


def log_probs(logits: torch.Tensor, temperature: float, dim: int) -> torch.Tensor:
    """log_softmax(logits / T) in float32 at least, whatever the logits' dtype: in bf16 (a teacher loaded in bf16 that takes
    token ids, which no dtype check stops; a student under autocast) the KL of two near distributions came out
    negative and its gradient pointed elsewhere. A float64 model's stay float64."""
    return F.log_softmax(at_least_float32(logits) / temperature, dim=dim)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def check_classes(logits: torch.Tensor) -> None:
    """Refuse logits with one class: the softmax over one class is 1, so the KL would be 0 at every
    step and distillation would silently do nothing (a regressor's single output, for example)."""
    axis = 1 if logits.dim() > 3 else -1
    if logits.dim() >= 2 and logits.shape[axis] == 1:
        raise RecipeError(
            f"distill_kd: the model's output has shape {tuple(logits.shape)}, one class, where the softmax is 1 and "
            "the KL is 0 whatever the student does. For a regressor, match the outputs with distill_kd.features "
            "(student and teacher: the last layer's name, loss: mse) and alpha: 0, or remove distill_kd"
        )


def check_teacher_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Refuse a teacher whose logits have another shape (other classes): distillation matches them class
    for class. compress() checks it on a batch before training; a loop of the user's (prepare, the
    Trainer) meets it at its first step, where F.kl_div's own message named neither teacher nor fix."""
    if teacher_logits.device != student_logits.device:  # prepare() without example_inputs meets it here first
        raise DataError(f"teacher: its logits are on {teacher_logits.device} and the model's on {student_logits.device}; "
                        "distillation compares them on every step, so put the teacher beside the model "
                        "(teacher.to(device))")
    if tuple(teacher_logits.shape) != tuple(student_logits.shape):
        raise DataError(
            f"teacher: its logits have shape {tuple(teacher_logits.shape)} and the model's {tuple(student_logits.shape)}; "
            "distillation matches them class for class, so give a teacher with the model's classes (or distil hidden "
            "states only: distill_kd.features with alpha: 0)"
        )


def dense_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Dense predictions [batch, classes, *positions] (a segmentation map: the class axis second, as
    F.cross_entropy takes it): T^2 * KL over the classes at each position, averaged over the batch
    and the positions. Why not the classifier's formula: its softmax over the last axis would
    compare the pixels of a row with each other, and `batchmean` would grow with the map's size."""
    return kl_per_position(student_logits, teacher_logits, temperature, 1).mean() * (temperature * temperature)


def kl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    dim: int) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) over the class axis `dim`, one value per remaining position."""
    return F.kl_div(log_probs(student_logits, temperature, dim), log_probs(teacher_logits.detach(), temperature, dim),
                    reduction="none", log_target=True).sum(dim)


# -- token-level logits (causal / masked LMs): session edit, kept apart from the rest -------------
def token_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                  token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL per token, summed over the vocabulary and averaged over the tokens whose
    mask is 1 (padding carries no signal), so the scale does not grow with the length."""
    t = temperature
    per_token = kl_per_position(student_logits, teacher_logits, t, -1)
    if token_mask is None or tuple(token_mask.shape) != tuple(per_token.shape):
        return per_token.mean() * (t * t)
    keep = token_mask.to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum().clamp_min(1.0) * (t * t)


def hinton_loss(student_logits, teacher_logits, targets, temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL + (1 - alpha) * CE: the whole Hinton objective in one call."""
    return alpha * kd_loss(student_logits, teacher_logits, temperature) + (1 - alpha) * F.cross_entropy(
        student_logits, targets
    )


def _check_pair_shapes(i: int, pair, student: tuple, teacher: tuple, axis: int) -> None:
    """A feature pair's outputs on the example inputs, before training: they must agree in every axis but the
    feature axis, which a projection bridges. Found at the first step, the mismatch was told with the shape of
    the package's own projection in place of the student module's, and neither module named."""
    width = axis % len(student) if student else 0
    bridged = student[:width] + (teacher[width] if len(teacher) > width else None,) + student[width + 1:]
    if len(student) != len(teacher) or bridged != teacher:
        raise RecipeError(
            f"distill_kd.features[{i}]: student '{pair.student}' gives {student} and teacher '{pair.teacher}' gives "
            f"{teacher} on the example inputs; they must agree in every axis but the feature axis (axis {width}, which a "
            "projection bridges): pair modules whose outputs have the same batch, position and spatial axes")


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse",
                 positions: torch.Tensor | None = None, axis: int | None = None) -> torch.Tensor:
    """MSE, or 1 - cosine similarity along the feature axis, averaged over the rest. The feature
    axis is `axis`, by default the channels of NCHW maps, else the last axis: the hidden size of
    [batch, tokens, hidden] states (feature_axis says which a captured module's output has).

    `positions` ([batch, tokens] bool) keeps only those positions of [batch, tokens, hidden]
    states in the average: padding carries no signal, and without the mask short sentences
    in a long batch would be pulled toward the teacher's states at their pad tokens.
    """
    student, teacher = at_least_float32(student), at_least_float32(teacher)  # a bf16 teacher's states, as the KL
    if student.shape != teacher.shape:
        raise RecipeError(
            f"distill_kd.features: student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} "
            "differ beyond the feature width; pair modules whose outputs agree in batch and position axes"
        )
    if axis is None:
        axis = 1 if student.dim() == 4 else -1
    if positions is not None and student.dim() == 3 and axis == -1 and tuple(positions.shape) == tuple(student.shape[:2]):
        keep = positions.to(student.dtype)
        if kind == "cosine":
            per = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
        else:
            per = (student - teacher).pow(2).mean(-1)
        return (per * keep).sum() / keep.sum().clamp_min(1.0)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=axis)).mean()
    return F.mse_loss(student, teacher)


class _Capture(CopiedWithoutGraph):
    """Forward hook that keeps the latest output of a named module."""

    def __init__(self, module: nn.Module):
        self.value = None
        self.module = module
        self.under_grad = True  # whether the latest output was computed with gradients on
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.value = first_tensor(output)
        self.under_grad = torch.is_grad_enabled()


def first_tensor(output) -> torch.Tensor | None:
    """A module's output as one tensor: itself, or the first tensor of a tuple, a list, a dict or a transformers
    ModelOutput (an encoder's last_hidden_state): a ModelOutput failed with "no attribute 'dim'"."""
    if isinstance(output, torch.Tensor) or output is None:
        return output
    items = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    return next((t for t in map(first_tensor, items) if t is not None), None)


def feature_axis(module: nn.Module, output: torch.Tensor) -> int:
    """The feature axis of `module`'s output: channels (1) for convolution feature maps, else the
    last axis. A 3-D output is [batch, channels, length] when the last layer in `module` that
    sets its width is a convolution or a BatchNorm (a Conv1d stack), else [batch, tokens, hidden]."""
    if output.dim() >= 4:
        return 1
    if output.dim() == 3:
        last = [m for m in module.modules() if isinstance(m, (*CONVOLUTIONS, *BATCH_NORMS, nn.Linear, nn.LayerNorm))]
        if last and isinstance(last[-1], (*CONVOLUTIONS, *BATCH_NORMS)):
            return 1
    return -1


def _projection(student_dim: int, teacher_dim: int, spatial_dims: int | None) -> nn.Module:
    """A learned map from the student's feature width to the teacher's: a 1x1 convolution over
    channel-first maps with `spatial_dims` spatial axes, else a Linear on the last axis."""
    if student_dim == teacher_dim:
        return nn.Identity()
    if spatial_dims is None:
        return nn.Linear(student_dim, teacher_dim, bias=False)
    return CONVOLUTIONS[spatial_dims - 1](student_dim, teacher_dim, 1, bias=False)


def module_choices(name: str, modules: dict) -> str:
    """The names a misspelled module name most likely meant, and the modules at its depth: the first 400
    characters of every name stopped inside layer 0's submodules, never reaching `encoder.layer.N`."""
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    level = [n for n in names if n.count(".") == name.count(".")] or names
    shown = ", ".join(level[:30]) + (f", ... ({len(level) - 30} more)" if len(level) > 30 else "")
    return (f"did you mean {', '.join(close)}? " if close else "") + f"the modules at that depth: {shown}"


class DistillKD(Technique):
    kind = "distill_kd"
    order = 30

    def __init__(self, config):
        super().__init__(config)
        self.student_caps: list[_Capture] = []
        self.teacher_caps: list[_Capture] = []
        self.projections = nn.ModuleList()
        self.feature_axes: list[int] = []
        self.teacher: nn.Module | None = None

    def setup(self, ctx: RunContext) -> None:
        if ctx.teacher is None:
            raise RecipeError("distill_kd needs a teacher: pass teacher=... to compress() or prepare() (the uncompressed model to distil from)")
        # frozen for the run: eval mode (BatchNorm/dropout fixed) and forward under no_grad.
        # requires_grad is left alone: the user's teacher object must not change under them
        # (a deep copy of it may be the next student).
        if self.config.alpha > 0 and getattr(getattr(ctx.model, "config", None), "problem_type", None) == \
                "multi_label_classification":
            raise RecipeError("distill_kd: the model is a multi-label classifier (config.problem_type "
                              "multi_label_classification: a sigmoid a label), where the softmax KL matches only the "
                              "differences between its logits (all shifted by 6, it read 0). Distil its logits with "
                              "distill_kd.features (student and teacher: the classifier layer's name, loss: mse) and "
                              "alpha: 0")
        self._teacher_was_training = ctx.teacher.training
        self.teacher = ctx.teacher.eval()
        s_mods, t_mods = dict(ctx.model.named_modules()), dict(self.teacher.named_modules())
        for i, pair in enumerate(self.config.features):
            for side, name, mods in (("student", pair.student, s_mods), ("teacher", pair.teacher, t_mods)):
                if name not in mods:
                    raise RecipeError(f"distill_kd.features[{i}].{side}: no module named '{name}' in the {side}; "
                                      f"{module_choices(name, mods)}")
            self.student_caps.append(_Capture(s_mods[pair.student]))
            self.teacher_caps.append(_Capture(t_mods[pair.teacher]))
        if self.config.features:
            self._build_projections(ctx)
            if self.config.cache_teacher:  # documented, but a run said nothing of it
                warnings.warn("distill_kd.cache_teacher is off where features are matched: the teacher runs on every "
                              "batch to give the hidden states they compare (remove cache_teacher, or the features)",
                              stacklevel=2)
        self.attached = True

    def _build_projections(self, ctx: RunContext) -> None:
        with torch.no_grad(), evaluating(ctx.model):  # the caller's modes kept (prepare() left a model in train mode)
            call_model(ctx.model, ctx.example_inputs)
            call_model(self.teacher, ctx.example_inputs)
        for i, (pair, s, t) in enumerate(zip(self.config.features, self.student_caps, self.teacher_caps)):
            for side, name, cap in (("student", pair.student, s), ("teacher", pair.teacher, t)):
                if cap.value is None:
                    raise RecipeError(f"distill_kd.features[{i}].{side}: '{name}' gave no tensor on the example inputs "
                                      "(it does not run in the forward, or returns none); pair modules the forward "
                                      "calls, whose output is a tensor (or a tuple, dict or ModelOutput holding one)")
        for i, (pair, s, t) in enumerate(zip(self.config.features, self.student_caps, self.teacher_caps)):
            axis = feature_axis(s.module, s.value)
            _check_pair_shapes(i, pair, tuple(s.value.shape), tuple(t.value.shape), axis)
            self.feature_axes.append(axis)
            spatial = s.value.dim() - 2 if axis == 1 else None
            proj = _projection(s.value.shape[axis], t.value.shape[axis], spatial)  # on the student's device and dtype
            self.projections.append(proj.to(device=s.value.device, dtype=s.value.dtype))

    def teacher_logits(self, ctx: RunContext) -> torch.Tensor:
        cached = ctx.batch_extra.get("teacher_logits")
        # the session runs the teacher on every batch when features are matched ("teacher_fresh")
        if cached is not None and (not self.config.features or ctx.batch_extra.get("teacher_fresh")):
            return cached
        with torch.no_grad():
            return call_model(self.teacher, ctx.batch_inputs)

    @staticmethod
    def _positions(ctx: RunContext) -> torch.Tensor | None:
        """Real-token positions of this batch when the student says which (hf.wrapper), else None."""
        fn = getattr(ctx.model, "position_mask", None)
        if callable(fn):
            return call_model(fn, ctx.batch_inputs)
        return ctx.batch_extra.get("token_mask")  # a dict batch's attention_mask (session)

    def task_weight(self) -> float:
        return 1.0 - self.config.alpha

    def loss_terms(self, ctx: RunContext) -> dict[str, torch.Tensor]:
        t_logits = self.teacher_logits(ctx)
        positions = self._positions(ctx)
        if self.config.alpha > 0:
            check_classes(ctx.outputs)
            check_teacher_logits(ctx.outputs, t_logits)
            loss = self.config.alpha * kd_loss(ctx.outputs, t_logits, self.config.temperature, positions)
        else:  # hidden states only: the logits need not even have the same classes
            loss = ctx.outputs.new_zeros(())
        stale = [pair.student for pair, s in zip(self.config.features, self.student_caps) if not s.under_grad]
        if stale and ctx.outputs.requires_grad:  # the hooks keep the latest forward, not the one that made `outputs`
            raise TrainingError(
                f"distill_kd.features: the student's module {stale[0]!r} last ran under torch.no_grad(), after the "
                "forward whose outputs reached session.loss (a monitoring or evaluation call in between): its hidden "
                "state is another batch's. Call session.loss right after the training forward, before any other call "
                "of the model (activation checkpointing with use_reentrant=True runs it under no_grad too, and the "
                "hidden state then carries no gradient: use use_reentrant=False)")
        for pair, s, t, proj, axis in zip(self.config.features, self.student_caps, self.teacher_caps, self.projections,
                                          self.feature_axes):
            loss = loss + pair.weight * feature_loss(proj(s.value), t.value.detach(), pair.loss, positions, axis)
        return {"distill": loss}

    def parameters(self) -> list[dict]:
        params = list(self.projections.parameters())
        return [{"params": params, "name": "feature_projections"}] if params else []

    def remove_hooks(self) -> None:
        """Detach from the models at the end of the run (hooks off, teacher mode restored)."""
        for c in self.student_caps + self.teacher_caps:
            c.handle.remove()
        if self.teacher is not None:
            self.teacher.train(self._teacher_was_training)

    def state_dict(self):
        return {"projections": self.projections.state_dict()}

    def load_state_dict(self, state):
        self.projections.load_state_dict(state["projections"])

"""DistilBERT-style students initialised from the teacher, and distillation losses.

A student that starts as a subset of the teacher's layers (Sanh et al., 2019) begins
close to the teacher's function, so distillation needs far fewer steps than training a
small model from scratch; on a CPU budget that is the difference between usable and not.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from jointcompress.errors import RecipeError, UnsupportedModelError
from jointcompress.model_call import model_device, to_device
from jointcompress.hf.layers import drop_layers, every_other
from jointcompress.hf.pruned import n_layers
from jointcompress.techniques.distill_kd import log_probs  # float32 whatever the logits' dtype (a bf16 teacher)


def make_student(teacher: nn.Module, layers: list[int] | int) -> nn.Module:
    """Deep copy of teacher keeping the given layer indices (or n evenly spread layers).

    Embeddings, pooler and classifier are copied too; the teacher is left untouched.
    """
    try:
        count = n_layers(teacher.config)
    except ValueError as err:  # modeling_pruned (loaded without this package) names the supported types so
        raise UnsupportedModelError(f"make_student: {err}".replace("for head/FFN/layer pruning", "for a student made by "
                                                                  "dropping layers")) from None
    keep = every_other(count, layers) if isinstance(layers, int) else list(layers)
    student = copy.deepcopy(teacher)
    drop_layers(student, keep)
    # provenance, saved with the config: the original model's layer indices, also for a student of a student
    # (whose own indices would name layers of the smaller teacher)
    earlier = getattr(teacher.config, "jc_student_of_layers", None)
    student.config.jc_student_of_layers = [earlier[i] for i in keep] if earlier else keep
    return student


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
            alpha: float = 1.0) -> torch.Tensor:
    """Hinton KD: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean.

    T^2 keeps the gradient scale independent of T. Teacher logits are detached.
    """
    if temperature <= 0:
        raise RecipeError(f"distill temperature must be > 0, got {temperature}")
    s, t = log_probs(student_logits, temperature, -1), log_probs(teacher_logits.detach(), temperature, -1)
    return alpha * temperature**2 * F.kl_div(s, t, log_target=True, reduction="batchmean")


class HiddenProjection(nn.Module):
    """Linear map from student width to teacher width (identity when they match)."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def hidden_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, attention_mask: torch.Tensor | None = None,
                kind: str = "cosine", proj: nn.Module | None = None) -> torch.Tensor:
    """Per-token hidden-state matching over non-padding tokens: 'cosine' (1 - cos) or 'mse'."""
    if proj is not None:
        student_h = proj(student_h)
    teacher_h = teacher_h.detach()
    if student_h.shape != teacher_h.shape:
        raise RecipeError(
            f"hidden states differ in shape {tuple(student_h.shape)} vs {tuple(teacher_h.shape)}; "
            "pass a HiddenProjection(student_dim, teacher_dim)"
        )
    if kind == "cosine":
        per_tok = 1 - F.cosine_similarity(student_h, teacher_h, dim=-1)
    elif kind == "mse":
        per_tok = (student_h - teacher_h).pow(2).mean(-1)
    else:
        raise RecipeError(f"hidden_loss kind={kind!r}; use 'cosine' or 'mse'")
    if attention_mask is None:
        return per_tok.mean()
    m = attention_mask.to(per_tok.dtype)
    return (per_tok * m).sum() / m.sum().clamp_min(1)


def task_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task's cross-entropy on hard labels."""
    return F.cross_entropy(logits, labels)


class Distiller(nn.Module):
    """loss(student, batch) = ce_weight*CE + alpha*KD + hidden_weight*sum_l hidden(l).

    layer_map maps student hidden-state index -> teacher hidden-state index (index 0 is
    the embeddings output, as in HF's output_hidden_states); by default the student's
    last layer matches the teacher's last. Projections are created when widths differ
    and must be trained: pass distiller.parameters() to the optimizer.
    """

    def __init__(self, teacher: nn.Module, *, temperature: float = 2.0, alpha: float = 1.0,
                 ce_weight: float = 0.0, hidden_weight: float = 0.0, hidden_kind: str = "cosine",
                 layer_map: dict[int, int] | None = None, student_dim: int | None = None,
                 teacher_dim: int | None = None):
        super().__init__()
        # list: keep it out of this module's parameters. The teacher object stays as the user gave it
        # (requires_grad, train/eval mode): it runs under no_grad and in eval mode only for each call.
        self.teacher = [teacher]
        self.temperature, self.alpha, self.ce_weight = temperature, alpha, ce_weight
        self.hidden_weight, self.hidden_kind = hidden_weight, hidden_kind
        self.layer_map = layer_map
        self.projs = nn.ModuleDict()
        if hidden_weight > 0 and layer_map:
            # the teacher's width from its config where not given: student_dim alone made no projection, and the
            # first call failed on hidden states of two widths
            td = teacher_dim or getattr(getattr(teacher, "config", None), "hidden_size", None) or student_dim
            sd = student_dim or td
            for s_idx in layer_map:
                self.projs[str(s_idx)] = HiddenProjection(sd, td)

    def forward(self, student: nn.Module, batch: dict) -> torch.Tensor:
        batch = to_device(batch, model_device(student))  # a CPU loader's rows beside the models
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        want_h = self.hidden_weight > 0
        teacher = self.teacher[0]
        was_training = teacher.training
        try:
            with torch.no_grad():
                t_out = teacher.eval()(**inputs, output_hidden_states=want_h)
        finally:
            teacher.train(was_training)
        s_out = student(**inputs, output_hidden_states=want_h)
        loss = kd_loss(s_out.logits, t_out.logits, self.temperature, self.alpha)
        if self.ce_weight > 0:
            loss = loss + self.ce_weight * task_ce(s_out.logits, batch["labels"])
        if want_h:
            layer_map = self.layer_map or {len(s_out.hidden_states) - 1: len(t_out.hidden_states) - 1}
            for s_idx, t_idx in layer_map.items():
                proj = self.projs[str(s_idx)] if str(s_idx) in self.projs else None
                loss = loss + self.hidden_weight * hidden_loss(
                    s_out.hidden_states[s_idx], t_out.hidden_states[t_idx],
                    inputs.get("attention_mask"), self.hidden_kind, proj)
        return loss


def student_layer_map(kept_layers: list[int]) -> dict[int, int]:
    """Hidden-state map for a student made of teacher layers kept_layers: student output
    k+1 should match teacher output kept_layers[k]+1 (index 0 = embeddings)."""
    return {k + 1: t + 1 for k, t in enumerate(kept_layers)}

"""Structured pruning of transformer units: attention heads, FFN intermediate neurons and
whole layers.

Built on jointcompress.hf: a `UnitMask` (learned scores -> soft mask centred on the exact
top-k threshold -> exactly-k binary mask with a straight-through gradient) multiplied into
each layer by hooks (heads: the input of the attention output projection; FFN: the input
of the FFN output projection; layers: the layer's output blended with its input, so a gate
of 0 makes the layer an exact identity). The hooks leave the HF forward and the weights
untouched, so LSQ parametrizations on the same Linear layers compose with them.

Schedule over the technique's window (plan.py sets `self.window`): before it the mask is
all ones; inside it the mask is soft, sigmoid((score - threshold) / T), with T falling
geometrically from `temperature` to 5 % of it; from the window's end on the mask is the
exact binary top-k, i.e. exactly the network `jointcompress.hf.finalize` produces by
removing heads / neurons physically. The number kept is fixed from the start (the soft
threshold sits between the k-th and (k+1)-th score), so the target count is exact.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from .. import schedules
from ..errors import RecipeError
from .base import RunContext, Technique

END_RATIO = 0.05  # final soft temperature, as a fraction of the configured one


def _hf_model(model: nn.Module, kind: str = "prune_heads / prune_ffn / prune_layers") -> nn.Module:
    hf = getattr(model, "hf", model)
    cfg = getattr(hf, "config", None)
    from ..hf.modeling_pruned import FAMILY_OF, UNITS

    if cfg is None or getattr(cfg, "model_type", None) not in FAMILY_OF:
        unit = {"prune_heads": "heads", "prune_ffn": "ffn", "prune_layers": "layers"}.get(kind)
        types = sorted(t for t, fam in FAMILY_OF.items()
                       if not t.startswith("jointcompress_") and (unit is None or unit in UNITS[fam]))
        causal = sorted(t for t in types if FAMILY_OF[t] in ("llama", "gpt2"))
        what = "a BERT-family or DistilBERT classifier (bare, or wrapped in jointcompress.hf.wrapper.SequenceClassifier)"
        if causal:
            what += f" or a causal LM ({', '.join(causal)})"
        model_type = getattr(cfg, "model_type", None)
        got = type(hf).__name__ + (f" (model_type {model_type!r})" if model_type else "")
        other = (" For a causal LM of another type, prune_unstructured and quant_lsq apply (docs/your-model.md, its "
                 "table of models)" if type(hf).__name__.endswith("ForCausalLM") else
                 " For a vision model use prune_structured: it removes the MLP width of ViT blocks, the "
                 "inverted-bottleneck width of ConvNeXt blocks and CNN channels (docs/architectures.md); attention "
                 "heads of vision models are not pruned")
        raise RecipeError(f"{kind}: need a Hugging Face transformer of model_type {', '.join(types)}: {what}; got "
                          f"{got}.{other}")
    _refuse_conv1d(hf, kind)
    return hf


def _refuse_conv1d(hf: nn.Module, kind: str) -> None:
    """GPT-2 as transformers builds it holds Conv1D projections ([in, out]), which heads and neurons are not cut
    from: prune_ffn ended in an AttributeError ('Conv1D' object has no attribute 'out_features')."""
    from ..session.checks import is_conv1d

    conv1d = next((n for n, m in hf.named_modules() if is_conv1d(m)), None)
    if conv1d is not None:
        raise RecipeError(f"{kind}: '{conv1d}' is a transformers Conv1D (GPT-2 style), which units are not cut from; "
                          "convert the model first with jointcompress.hf.causal.conv1d_to_linear(model) (exact)")


@functools.lru_cache(maxsize=None)
def _mask_class():
    from ..hf.masks import UnitMask

    class ScheduledUnitMask(UnitMask):
        """A UnitMask that is all ones until its window opens (`active` False)."""

        active = True

        def forward(self) -> torch.Tensor:
            if not self.active:
                return torch.ones_like(self.scores).detach()
            return super().forward()

    return ScheduledUnitMask


def kept_units(layers: int, units: int, cfg, sparsity: float | None = None) -> tuple[int, int]:
    """(kept per layer with `per_layer`, else kept in all; kept in all) for `sparsity` (default the
    config's): at least max(1, min_keep of the units) in every layer. The size target of an HF
    recipe (hf/size_target.py) plans with the same counts the technique keeps."""
    sparsity = cfg.sparsity if sparsity is None else sparsity
    min_per_layer = max(1, math.ceil(cfg.min_keep * units))
    if cfg.per_layer:
        keep = max(min_per_layer, round(units * (1 - sparsity)))
        return keep, keep * layers
    keep = max(min_per_layer * layers, round(layers * units * (1 - sparsity)))
    return keep, keep


class _PruneUnits(Technique):
    order = 6  # masks before quantization (LSQ is 20)
    unit = "unit"

    def __init__(self, config):
        super().__init__(config)
        self.mask: nn.Module | None = None
        self.handles: list = []
        self.keep = 0  # kept per layer (per_layer) or in all (global)
        self.keep_total = 0
        self.total = 0
        self.current_temperature = float(config.temperature)

    # -- per-unit-type hooks ------------------------------------------------------------------
    def _shape(self, hf: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def _magnitude(self, hf: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def _output_change(self, ctx: RunContext, hf: nn.Module) -> torch.Tensor:
        raise NotImplementedError  # prune_layers only: the recipe offers init: output for it alone

    def _attach(self, hf: nn.Module, mask) -> list:
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        from ..hf.masks import normalise_importance

        hf = _hf_model(ctx.model, self.kind)
        layers, units = self._shape(hf)
        cfg = self.config
        min_per_layer = max(1, math.ceil(cfg.min_keep * units))
        self.keep, self.keep_total = kept_units(layers, units, cfg)
        self.total = layers * units
        change = self._output_change(ctx, hf) if cfg.init == "output" and ctx.example_inputs is not None else None
        if change is not None and float(change.max()) > MEASURABLE_CHANGE:
            init = normalise_importance(change.float())
        elif cfg.init in ("magnitude", "output"):  # no batch to measure on, or a head whose outputs no layer moves
            init = normalise_importance(self._magnitude(hf).float())
        else:
            init = 3.0
        self.mask = _mask_class()(layers, units, self.keep, per_layer=cfg.per_layer, min_per_layer=min_per_layer,
                                  init=init, name=self.kind)
        self.handles = self._attach(hf, self.mask)
        self.attached = True
        self._update(ctx.step)

    def on_step(self, ctx: RunContext) -> None:
        if not self.frozen:
            self._update(ctx.step)

    def _update(self, step: int) -> None:
        m = self.mask
        m.active = step >= self.window[0]
        p = schedules.progress(step, *self.window)
        if p >= 1.0:
            m.hard, m.temperature = True, float(self.config.temperature) * END_RATIO
        else:
            m.hard = False
            m.temperature = schedules.temperature(float(self.config.temperature), p, END_RATIO)
        self.current_temperature = 0.0 if m.hard else float(m.temperature)

    def freeze(self) -> None:
        super().freeze()
        if self.mask is not None:
            self.mask.active, self.mask.hard = True, True
            self.mask.scores.requires_grad_(False)

    def at_target(self) -> bool:
        return self.mask is not None and bool(self.mask.active and self.mask.hard)

    def parameters(self) -> list[dict]:
        if self.mask is None or self.frozen:
            return []
        return [{"params": [self.mask.scores], "lr": self.config.score_lr, "weight_decay": 0.0, "name": f"{self.kind}_scores"}]

    def current_mask(self) -> torch.Tensor:
        with torch.no_grad():
            return self.mask().detach().clone()

    def kept(self) -> list[list[int]]:
        """Per layer, the indices of the units the exact top-k keeps (what finalize keeps)."""
        return self.mask.kept()

    def metrics(self) -> dict[str, float]:
        if self.mask is None:
            return {}
        kept = sum(len(k) for k in self.kept())
        return {
            f"{self.unit}_kept": float(kept),
            f"{self.unit}_total": float(self.total),
            f"{self.unit}_sparsity": 1.0 - kept / max(1, self.total),
            "temperature": self.current_temperature,
        }

    def detach(self) -> None:
        """Remove the mask hooks from the model (finalize does this before physical removal)."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def state_dict(self):
        """The scores and where the schedule has the mask (open, hard, temperature): the mask's
        schedule state lives on the mask, not in the technique's scalars, and a resumed session
        does not re-run the schedule update of the step it was saved at."""
        if self.mask is None:
            return {}
        m = self.mask
        return {
            "scores": m.scores.detach(),
            "active": torch.tensor(bool(m.active)),
            "hard": torch.tensor(bool(m.hard)),
            "temperature": torch.tensor(float(m.temperature), dtype=torch.float64),
        }

    def load_state_dict(self, state):
        if self.mask is None:
            return
        m = self.mask
        if "scores" in state:
            with torch.no_grad():
                m.scores.copy_(state["scores"])
        if "temperature" in state:  # a checkpoint of an older version keeps setup's schedule state
            m.active, m.hard = bool(state["active"]), bool(state["hard"])
            m.temperature = float(state["temperature"])


class PruneHeads(_PruneUnits):
    """Remove a fraction `sparsity` of the attention heads (global top-k, or per layer)."""

    kind = "prune_heads"
    unit = "heads"

    def _shape(self, hf):
        from ..hf.heads import head_counts

        counts = head_counts(hf)
        if len(set(counts)) != 1:
            raise RecipeError(f"prune_heads: the model's layers have different head counts {counts} (pruned before: an "
                              "earlier run's hf_model?); give the unpruned model, or compress this one further "
                              "with prune_layers, prune_unstructured and quant_lsq")
        return len(counts), counts[0]

    def _magnitude(self, hf):
        """Head h of layer l: ||W_v rows of h|| * ||W_o columns of h|| (its output path)."""
        from ..hf.modeling_pruned import ARCH, family, get_sub, head_dim, layers

        fam, hd = family(hf.config), head_dim(hf.config)
        rows = []
        for layer in layers(hf):
            v = get_sub(layer, ARCH[fam]["v"]).weight.detach()
            o = get_sub(layer, ARCH[fam]["o"]).weight.detach()
            vn = v.pow(2).sum(1).view(-1, hd).sum(1).sqrt()
            on = o.pow(2).sum(0).view(-1, hd).sum(1).sqrt()
            rows.append(vn * on)
        return torch.stack(rows)

    def _attach(self, hf, mask):
        from ..hf.heads import attach_head_mask

        return attach_head_mask(hf, mask)


class PruneFFN(_PruneUnits):
    """Remove a fraction `sparsity` of the FFN intermediate neurons (global top-k, or per layer)."""

    kind = "prune_ffn"
    unit = "neurons"

    def _shape(self, hf):
        from ..hf.ffn import ffn_widths

        widths = ffn_widths(hf)
        if len(set(widths)) != 1:
            raise RecipeError(f"prune_ffn: the model's layers have different FFN widths {widths} (pruned before: an "
                              "earlier run's hf_model?); give the unpruned model, or compress this one further "
                              "with prune_layers, prune_unstructured and quant_lsq")
        return len(widths), widths[0]

    def _magnitude(self, hf):
        """Neuron j: ||W_in row j|| * ||W_out column j||."""
        from ..hf.modeling_pruned import ARCH, family, get_sub, layers

        fam = family(hf.config)
        rows = []
        for layer in layers(hf):
            w_in = get_sub(layer, ARCH[fam]["ffn_in"]).weight.detach()
            w_out = get_sub(layer, ARCH[fam]["ffn_out"]).weight.detach()
            rows.append(w_in.norm(dim=1) * w_out.norm(dim=0))
        return torch.stack(rows)

    def _attach(self, hf, mask):
        from ..hf.ffn import attach_ffn_mask

        return attach_ffn_mask(hf, mask)


# init: output ranks layers by the KL their skipping causes; under this (an untrained classifier head, whose
# logits sit near zero for every input) the KLs are float rounding, and z-scoring them would rank layers by noise
MEASURABLE_CHANGE = 1e-6


class PruneLayers(_PruneUnits):
    """Remove a fraction `sparsity` of the transformer layers (one global top-k over layers)."""

    kind = "prune_layers"
    unit = "layers"

    def _shape(self, hf):
        from ..hf.pruned import n_layers

        return 1, n_layers(hf.config)

    def _magnitude(self, hf):
        from ..hf.layers import layer_magnitude

        return layer_magnitude(hf)

    def _output_change(self, ctx, hf):
        from ..hf.layers import layer_output_change

        return layer_output_change(ctx.model, hf, ctx.example_inputs)

    def _attach(self, hf, mask):
        from ..hf.layers import attach_layer_gate

        return attach_layer_gate(hf, mask)

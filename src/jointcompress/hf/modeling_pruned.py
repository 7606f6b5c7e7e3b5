"""Pruned BERT / DistilBERT / RoBERTa / ELECTRA / DeBERTa-v2 classifiers and Llama / Mistral / Qwen2 /
GPT-2 causal LMs whose layers may differ in head count and FFN width.

Why this file: transformers 5.x removed `prune_heads` / `pruned_heads`, and its encoder
modules build every layer with the same width from the config. A physically
pruned model therefore cannot be rebuilt by the stock classes. We store the per-layer
widths in the config (`heads_per_layer`, `intermediate_per_layer`) under our own
model_type ("jointcompress_bert", "jointcompress_distilbert", ...: PRUNED_CLASSES) and subclass the
stock models so that construction shrinks each layer's Linear modules before the weights load. GPT-2's
projections are transformers' Conv1D (weights stored [in, out]); jointcompress trains them as nn.Linear
(hf.causal.conv1d_to_linear), so its class builds them as Linear too and the saved weights load as saved.

The file is deliberately self-contained (imports only torch, transformers and
huggingface_hub): export copies it into the model folder and points `auto_map` at it, so
users without jointcompress can load with `trust_remote_code=True`; users with
jointcompress installed just `import jointcompress.hf` (which registers these classes
with the Auto classes) and need no remote code.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    DistilBertConfig,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

# Dotted paths inside one transformer layer, per family, and the config field names.
ARCH = {
    "bert": {
        "layers": "encoder.layer",
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "attn": "attention.self",
        "heads_attr": "num_attention_heads",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
        "hidden": "hidden_size",
        "n_heads": "num_attention_heads",
        "ffn": "intermediate_size",
        "n_layers": "num_hidden_layers",
    },
    "distilbert": {
        "layers": "transformer.layer",
        "q": "attention.q_lin",
        "k": "attention.k_lin",
        "v": "attention.v_lin",
        "o": "attention.out_lin",
        "attn": "attention",
        "heads_attr": "n_heads",
        "ffn_in": "ffn.lin1",
        "ffn_out": "ffn.lin2",
        "hidden": "dim",
        "n_heads": "n_heads",
        "ffn": "hidden_dim",
        "n_layers": "n_layers",
    },
}
ARCH["roberta"] = ARCH["bert"]  # same module names (embeddings and the classification head differ)
ARCH["electra"] = ARCH["bert"]  # same layer modules (its embeddings may be narrower, projected up)
# DeBERTa-v2 / v3: disentangled attention; the relative positions' own projections (when not shared with
# the key and query ones) are per head too ("per_head": sliced with q, k and v)
ARCH["deberta-v2"] = {**ARCH["bert"], "q": "attention.self.query_proj", "k": "attention.self.key_proj",
                      "v": "attention.self.value_proj",
                      "per_head": ("attention.self.pos_key_proj", "attention.self.pos_query_proj")}
# Causal LMs: FFN neurons only (Llama / Mistral / Qwen2 gated MLP: gate and up rows go together; GPT-2
# after hf.causal.conv1d_to_linear). Heads are not: grouped-query attention shares each KV head
# among several query heads, and GPT-2 fuses q, k and v into one projection.
ARCH["llama"] = {
    "layers": "layers",
    "ffn_in": "mlp.up_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_out": "mlp.down_proj",
    "hidden": "hidden_size",
    "n_heads": "num_attention_heads",
    "ffn": "intermediate_size",
    "n_layers": "num_hidden_layers",
}
ARCH["gpt2"] = {
    "layers": "h",
    "ffn_in": "mlp.c_fc",
    "ffn_out": "mlp.c_proj",
    "hidden": "n_embd",
    "n_heads": "n_head",
    "ffn": "n_inner",
    "n_layers": "n_layer",
}
UNITS = {"bert": {"heads", "ffn", "layers"}, "distilbert": {"heads", "ffn", "layers"},
         "roberta": {"heads", "ffn", "layers"}, "electra": {"heads", "ffn", "layers"},
         "deberta-v2": {"heads", "ffn", "layers"}, "llama": {"ffn"}, "gpt2": {"ffn"}}

FAMILY_OF = {
    "bert": "bert",
    "jointcompress_bert": "bert",
    "distilbert": "distilbert",
    "jointcompress_distilbert": "distilbert",
    "roberta": "roberta",
    "jointcompress_roberta": "roberta",
    "electra": "electra",
    "jointcompress_electra": "electra",
    "deberta-v2": "deberta-v2",
    "jointcompress_deberta-v2": "deberta-v2",
    "llama": "llama",
    "jointcompress_llama": "llama",
    "mistral": "llama",
    "jointcompress_mistral": "llama",
    "qwen2": "llama",  # the same gated MLP (gate_proj, up_proj, down_proj)
    "jointcompress_qwen2": "llama",
    "gpt2": "gpt2",
    "jointcompress_gpt2": "gpt2",
}


def require_units(config, unit: str) -> None:
    """ValueError naming the model type and what it supports when `unit` pruning is not."""
    fam = family(config)
    if unit not in UNITS[fam]:
        raise ValueError(
            f"{unit} pruning is not supported for model_type {config.model_type!r} (supported: "
            f"{', '.join(sorted(UNITS[fam]))}); grouped-query attention shares KV heads among query heads and GPT-2 "
            "fuses q/k/v, so heads and layers of causal LMs are left to a later version"
        )


def family(config) -> str:
    """The family of a config (ARCH's keys); ValueError names the supported types."""
    fam = FAMILY_OF.get(getattr(config, "model_type", None))
    if fam is None:
        raise ValueError(
            f"model_type {config.model_type!r} is not supported for head/FFN/layer pruning; "
            f"supported: {sorted(FAMILY_OF)}"
        )
    return fam


def get_sub(module: nn.Module, dotted: str) -> nn.Module:
    """Submodule at a dotted path."""
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def has_sub(module: nn.Module, dotted: str) -> bool:
    try:
        get_sub(module, dotted)
    except AttributeError:
        return False
    return True


def set_sub(module: nn.Module, dotted: str, new: nn.Module) -> None:
    """Replace the submodule at a dotted path."""
    parent, _, last = dotted.rpartition(".")
    setattr(get_sub(module, parent) if parent else module, last, new)


def layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer layers of a (task or base) model."""
    return get_sub(model.base_model, ARCH[family(model.config)]["layers"])


def head_dim(config) -> int:
    """Per-head width; fixed by the unpruned model and kept by pruning."""
    a = ARCH[family(config)]
    return getattr(config, a["hidden"]) // getattr(config, a["n_heads"])


def slice_linear(lin: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear keeping rows out_idx and columns in_idx of lin (bias follows rows).

    Refuses parametrized weights (e.g. an LSQ fake-quantizer): prune first, or remove the
    parametrization, so the sliced weights are the real ones and not a quantized view.
    """
    if hasattr(lin, "parametrizations"):
        raise ValueError(
            "cannot physically prune a Linear whose weight is parametrized (fake-quant); "
            "remove the parametrization first or prune before attaching quantizers"
        )
    w = lin.weight.detach()
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            b = lin.bias.detach()
            new.bias.copy_(b.index_select(0, out_idx.to(b.device)) if out_idx is not None else b)
    new.weight.requires_grad_(lin.weight.requires_grad)
    frozen = getattr(lin, "input_quant", None)
    if frozen is not None:  # a finalized layer's input rounding (per tensor), the same on the kept inputs; this
        new.input_quant = frozen  # file is loaded as remote code without jointcompress: its hook moves as it is
        for hook in lin._forward_pre_hooks.values():
            new.register_forward_pre_hook(hook)
    return new


def keep_heads(layer: nn.Module, fam: str, heads: torch.Tensor, hd: int) -> None:
    """Keep only the listed heads of one layer (q/k/v rows and output-projection columns)."""
    a = ARCH[fam]
    heads = torch.as_tensor(heads, dtype=torch.long).sort().values
    idx = (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
    for key in ("q", "k", "v"):
        set_sub(layer, a[key], slice_linear(get_sub(layer, a[key]), out_idx=idx))
    for path in a.get("per_head", ()):
        if has_sub(layer, path):
            set_sub(layer, path, slice_linear(get_sub(layer, path), out_idx=idx))
    set_sub(layer, a["o"], slice_linear(get_sub(layer, a["o"]), in_idx=idx))
    attn = get_sub(layer, a["attn"])
    setattr(attn, a["heads_attr"], int(heads.numel()))
    if hasattr(attn, "all_head_size"):
        attn.all_head_size = int(heads.numel()) * hd


def keep_neurons(layer: nn.Module, fam: str, neurons: torch.Tensor) -> None:
    """Keep only the listed FFN intermediate neurons of one layer."""
    a = ARCH[fam]
    idx = torch.as_tensor(neurons, dtype=torch.long).sort().values
    set_sub(layer, a["ffn_in"], slice_linear(get_sub(layer, a["ffn_in"]), out_idx=idx))
    if "ffn_gate" in a:  # gated MLP: down(act(gate(x)) * up(x)); neuron j is row j of gate and up
        set_sub(layer, a["ffn_gate"], slice_linear(get_sub(layer, a["ffn_gate"]), out_idx=idx))
    set_sub(layer, a["ffn_out"], slice_linear(get_sub(layer, a["ffn_out"]), in_idx=idx))


def apply_widths(model: nn.Module) -> None:
    """Shrink each layer to config.heads_per_layer / intermediate_per_layer (construction time).

    Keeps the first k heads/neurons: the values are overwritten when weights load, and
    pruning always stores the kept units contiguously in ascending order.
    """
    cfg = model.config
    fam = family(cfg)
    hd = head_dim(cfg)
    heads = getattr(cfg, "heads_per_layer", None)
    ffn = getattr(cfg, "intermediate_per_layer", None)
    mods = layers(model)
    for name, widths in (("heads_per_layer", heads), ("intermediate_per_layer", ffn)):
        if widths is not None and len(widths) != len(mods):
            raise ValueError(f"config.{name} has {len(widths)} entries but the model has {len(mods)} layers")
    for i, layer in enumerate(mods):
        if heads is not None and heads[i] != getattr(cfg, ARCH[fam]["n_heads"]):
            keep_heads(layer, fam, torch.arange(heads[i]), hd)
        if ffn is not None and ffn[i] != getattr(cfg, ARCH[fam]["ffn"]):
            keep_neurons(layer, fam, torch.arange(ffn[i]))


REMOTE_FILE = "modeling_pruned.py"  # this file, as a saved folder holds it


def write_remote_code(model: nn.Module, folder) -> None:
    """Make a folder save_pretrained wrote loadable without jointcompress: a copy of this file beside the weights
    and config.json's auto_map pointing at its classes (trust_remote_code=True). Plain file writes (this file
    imports only torch, transformers and huggingface_hub); config.json is replaced whole (a temporary file, then
    os.replace), so a failure leaves the one save_pretrained wrote."""
    import json
    import os
    import shutil
    import tempfile
    from pathlib import Path

    out = Path(folder)
    stem = REMOTE_FILE[:-3]
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoConfig": f"{stem}.{type(model.config).__name__}",
                          auto_class(model.config.model_type): f"{stem}.{type(model).__name__}"}
    if Path(__file__).resolve() != (out / REMOTE_FILE).resolve():
        shutil.copyfile(__file__, out / REMOTE_FILE)
    with tempfile.NamedTemporaryFile("w", dir=out, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
        tmp.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp.name, out / "config.json")


class SavesItsCode:
    """save_pretrained also writes this file and the auto_map that loads it (write_remote_code): a pruned model
    saved with a plain model.save_pretrained() after finalize could not be loaded without jointcompress, where
    export_folder and CompressionTrainer.save_model's folders could."""

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """With push_to_hub, the Hub gets the folder once its code is written: transformers' own push uploaded what
        it had saved before this file and the auto_map were there, so the Hub copy did not load."""
        import os

        hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private") if k in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        write_remote_code(self, save_directory)
        if push_to_hub:  # transformers' push_to_hub saves through this method again, into a folder it uploads
            self.push_to_hub(hub.pop("repo_id", os.path.basename(os.path.normpath(save_directory))),
                             token=kwargs.get("token"), **hub)


@strict
class JCBertConfig(BertConfig):
    """BertConfig plus per-layer widths (None = unpruned)."""

    model_type = "jointcompress_bert"
    heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None


@strict
class JCDistilBertConfig(DistilBertConfig):
    """DistilBertConfig plus per-layer widths (None = unpruned)."""

    model_type = "jointcompress_distilbert"
    heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None


@strict
class JCRobertaConfig(RobertaConfig):
    """RobertaConfig plus per-layer widths (None = unpruned)."""

    model_type = "jointcompress_roberta"
    heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None


@strict
class JCElectraConfig(ElectraConfig):
    """ElectraConfig plus per-layer widths (None = unpruned)."""

    model_type = "jointcompress_electra"
    heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None


@strict
class JCDebertaV2Config(DebertaV2Config):
    """DebertaV2Config plus per-layer widths (None = unpruned)."""

    model_type = "jointcompress_deberta-v2"
    heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None


class JCBertForSequenceClassification(SavesItsCode, BertForSequenceClassification):
    """BertForSequenceClassification whose layers are shrunk to the config's widths."""

    config_class = JCBertConfig

    def __init__(self, config):
        super().__init__(config)
        apply_widths(self)


class JCDistilBertForSequenceClassification(SavesItsCode, DistilBertForSequenceClassification):
    """DistilBertForSequenceClassification whose layers are shrunk to the config's widths."""

    config_class = JCDistilBertConfig

    def __init__(self, config):
        super().__init__(config)
        apply_widths(self)


class JCRobertaForSequenceClassification(SavesItsCode, RobertaForSequenceClassification):
    """RobertaForSequenceClassification whose layers are shrunk to the config's widths."""

    config_class = JCRobertaConfig

    def __init__(self, config):
        super().__init__(config)
        apply_widths(self)


class JCElectraForSequenceClassification(SavesItsCode, ElectraForSequenceClassification):
    """ElectraForSequenceClassification whose layers are shrunk to the config's widths."""

    config_class = JCElectraConfig

    def __init__(self, config):
        super().__init__(config)
        apply_widths(self)


class JCDebertaV2ForSequenceClassification(SavesItsCode, DebertaV2ForSequenceClassification):
    """DebertaV2ForSequenceClassification whose layers are shrunk to the config's widths."""

    config_class = JCDebertaV2Config

    def __init__(self, config):
        super().__init__(config)
        apply_widths(self)


@strict
class JCLlamaConfig(LlamaConfig):
    """LlamaConfig plus per-layer FFN widths (None = unpruned)."""

    model_type = "jointcompress_llama"
    heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None


@strict
class JCMistralConfig(MistralConfig):
    """MistralConfig plus per-layer FFN widths (None = unpruned)."""

    model_type = "jointcompress_mistral"
    heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None


@strict
class JCQwen2Config(Qwen2Config):
    """Qwen2Config plus per-layer FFN widths (None = unpruned)."""

    model_type = "jointcompress_qwen2"
    heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None


@strict
class JCGPT2Config(GPT2Config):
    """GPT2Config plus per-layer FFN widths (None = unpruned); its projections are nn.Linear."""

    model_type = "jointcompress_gpt2"
    heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None


class JCLlamaForCausalLM(SavesItsCode, LlamaForCausalLM):
    """LlamaForCausalLM whose MLPs are shrunk to the config's widths."""

    config_class = JCLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        apply_widths(self)


class JCMistralForCausalLM(SavesItsCode, MistralForCausalLM):
    """MistralForCausalLM whose MLPs are shrunk to the config's widths."""

    config_class = JCMistralConfig

    def __init__(self, config):
        super().__init__(config)
        apply_widths(self)


class JCQwen2ForCausalLM(SavesItsCode, Qwen2ForCausalLM):
    """Qwen2ForCausalLM whose MLPs are shrunk to the config's widths."""

    config_class = JCQwen2Config

    def __init__(self, config):
        super().__init__(config)
        apply_widths(self)


class JCGPT2LMHeadModel(SavesItsCode, GPT2LMHeadModel):
    """GPT2LMHeadModel with nn.Linear projections (as jointcompress trains them) and MLPs shrunk to the
    config's widths."""

    config_class = JCGPT2Config

    def __init__(self, config):
        super().__init__(config)
        linear_projections(self)
        apply_widths(self)


@torch.no_grad()
def linear_projections(model: nn.Module) -> nn.Module:
    """Every transformers Conv1D (x @ W + b, W stored [in, out]) replaced by the nn.Linear computing the
    same (W transposed), in place; returns the model."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                w = child.weight  # [in, out]
                lin = nn.Linear(w.shape[0], w.shape[1], bias=child.bias is not None, device=w.device, dtype=w.dtype)
                lin.weight.copy_(w.t())
                if child.bias is not None:
                    lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
    return model


# by the stock model_type: (config class, model class)
PRUNED_CLASSES = {
    "bert": (JCBertConfig, JCBertForSequenceClassification),
    "distilbert": (JCDistilBertConfig, JCDistilBertForSequenceClassification),
    "roberta": (JCRobertaConfig, JCRobertaForSequenceClassification),
    "electra": (JCElectraConfig, JCElectraForSequenceClassification),
    "deberta-v2": (JCDebertaV2Config, JCDebertaV2ForSequenceClassification),
    "llama": (JCLlamaConfig, JCLlamaForCausalLM),
    "mistral": (JCMistralConfig, JCMistralForCausalLM),
    "qwen2": (JCQwen2Config, JCQwen2ForCausalLM),
    "gpt2": (JCGPT2Config, JCGPT2LMHeadModel),
}
CAUSAL = ("llama", "mistral", "qwen2", "gpt2")  # registered with AutoModelForCausalLM, the rest as classifiers


def auto_class(model_type: str) -> str:
    """The Auto class a pruned class registers with (and an exported folder's auto_map names)."""
    stock = model_type.removeprefix("jointcompress_")
    return "AutoModelForCausalLM" if stock in CAUSAL else "AutoModelForSequenceClassification"


def register() -> None:
    """Register the pruned classes with AutoConfig and AutoModelForSequenceClassification (classifiers) or
    AutoModelForCausalLM (causal LMs)."""
    import transformers
    from transformers import AutoConfig

    for stock, (cfg_cls, model_cls) in PRUNED_CLASSES.items():
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        getattr(transformers, auto_class(stock)).register(cfg_cls, model_cls, exist_ok=True)

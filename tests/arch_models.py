"""transformers' own model classes at tiny random configs (no download), as float-input classifiers,
two plain torch signal models (a 1-D convolutional net for audio or sensor series, a 3-D one for video)
torch's own nn.TransformerEncoder (its nn.MultiheadAttention converted by attention.mha_to_linear) and
torch's nn.LSTM (converted by recurrent.rnn_to_linear).

Vision models take pixel_values [B, 3, 32, 32]; text models take float `inputs_embeds`
[B, T, 32] (so they run through compress() as they are), and every wrapper returns the
logits tensor, which is what the core API, the artifact and the ONNX export expect.
"""
from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

CLASSES = 3
HIDDEN = 32
SEQ = 6
VISION = ("resnet", "mobilenetv2", "convnext", "vit")
TEXT = ("bert", "distilbert", "roberta", "electra", "deberta-v2")
SIGNALS = ("conv1d", "conv3d")  # nn.Conv1d / nn.Conv3d with BatchNorm and a residual addition
TORCH_TEXT = ("torch-transformer", "torch-lstm")  # nn.TransformerEncoder / nn.LSTM over float [B, T, 32] inputs
ARCHS = VISION + TEXT + SIGNALS + TORCH_TEXT
INPUT_SHAPES = {"conv1d": (4, 64), "conv3d": (3, 4, 16, 16)}
CAUSAL = ("gpt2",)  # last-token logits from float inputs_embeds


class LastToken(nn.Module):
    """A causal LM as a classifier of its last position: logits [B, vocab] from inputs_embeds."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(inputs_embeds=x).logits[:, -1]


class Logits(nn.Module):
    """Call the HF model with one float input under `key` and return its logits."""

    def __init__(self, hf: nn.Module, key: str):
        super().__init__()
        self.hf = hf
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(**{self.key: x}).logits


class SignalNet(nn.Module):
    """conv-BN-ReLU, a residual block, a strided conv, global pooling and a Linear head, in 1-D or 3-D."""

    def __init__(self, dims: int, channels: int = 24):
        super().__init__()
        conv, norm = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        cin = INPUT_SHAPES[f"conv{dims}d"][0]
        self.stem = nn.Sequential(conv(cin, channels, 3, padding=1, bias=False), norm(channels), nn.ReLU())
        self.block = nn.Sequential(conv(channels, channels, 3, padding=1, bias=False), norm(channels), nn.ReLU(),
                                   conv(channels, channels, 3, padding=1, bias=False), norm(channels))
        self.down = nn.Sequential(conv(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU())
        self.pool = {1: nn.AdaptiveAvgPool1d, 3: nn.AdaptiveAvgPool3d}[dims](1)
        self.head = nn.Linear(2 * channels, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.head(self.pool(self.down(h)).flatten(1))


class TorchTransformer(nn.Module):
    """torch's nn.TransformerEncoder (2 layers, 4 heads) over float token features, mean-pooled into a
    Linear head; its attention converted to Linear projections (attention.mha_to_linear) so they are compressed."""

    def __init__(self):
        super().__init__()
        from jointcompress.attention import mha_to_linear

        layer = nn.TransformerEncoderLayer(HIDDEN, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = mha_to_linear(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


class TorchLSTM(nn.Module):
    """torch's nn.LSTM (2 layers, bidirectional) over float token features, its last step into a Linear head;
    converted to Linear layers (recurrent.rnn_to_linear) so its weights are compressed."""

    def __init__(self):
        super().__init__()
        from jointcompress.recurrent import rnn_to_linear

        self.front = nn.Linear(HIDDEN, HIDDEN)
        self.rnn = rnn_to_linear(nn.LSTM(HIDDEN, HIDDEN, 2, batch_first=True, bidirectional=True))
        self.head = nn.Linear(2 * HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(torch.relu(self.front(x)))
        return self.head(out[:, -1])


def _text_kwargs() -> dict:
    return dict(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, num_labels=CLASSES)


def _hf(name: str) -> nn.Module:
    t = transformers
    if name == "resnet":
        return t.ResNetForImageClassification(t.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=CLASSES))
    if name == "mobilenetv2":
        return t.MobileNetV2ForImageClassification(t.MobileNetV2Config(
            image_size=32, depth_multiplier=0.25, num_labels=CLASSES))
    if name == "convnext":
        return t.ConvNextForImageClassification(t.ConvNextConfig(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=4, num_labels=CLASSES))
    if name == "vit":
        return t.ViTForImageClassification(t.ViTConfig(
            image_size=32, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, num_labels=CLASSES))
    if name == "bert":
        return t.BertForSequenceClassification(t.BertConfig(**_text_kwargs()))
    if name == "distilbert":
        return t.DistilBertForSequenceClassification(t.DistilBertConfig(
            vocab_size=64, dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
            num_labels=CLASSES))
    if name == "roberta":
        return t.RobertaForSequenceClassification(t.RobertaConfig(**_text_kwargs(), pad_token_id=1))
    if name == "electra":
        return t.ElectraForSequenceClassification(t.ElectraConfig(embedding_size=HIDDEN, **_text_kwargs()))
    if name == "deberta-v2":
        return t.DebertaV2ForSequenceClassification(t.DebertaV2Config(**_text_kwargs()))
    if name == "gpt2":
        from jointcompress.hf.causal import conv1d_to_linear

        # GPT-2's blocks are transformers' Conv1D: converted to nn.Linear (exactly) so the techniques
        # select them; the LM head untied, since compressing a tied head would change the embedding
        return conv1d_to_linear(t.GPT2LMHeadModel(t.GPT2Config(
            vocab_size=CLASSES, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0,
            tie_word_embeddings=False)))
    raise ValueError(f"unknown architecture {name!r}; known: {ARCHS}")


def build(name: str, seed: int = 0) -> nn.Module:
    """A fresh tiny classifier of architecture `name` (eval mode, deterministic weights)."""
    torch.manual_seed(seed)
    if name in SIGNALS:
        return SignalNet(int(name[4])).eval()
    if name == "torch-lstm":
        return TorchLSTM().eval()
    if name in TORCH_TEXT:
        return TorchTransformer().eval()
    if name in CAUSAL:
        return LastToken(_hf(name).eval()).eval()
    return Logits(_hf(name).eval(), "pixel_values" if name in VISION else "inputs_embeds").eval()


def data(name: str, n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random float inputs of the shape `name` takes, and random class labels."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, 32, 32) if name in VISION else (n, *INPUT_SHAPES[name]) if name in SIGNALS else (n, SEQ, HIDDEN)
    return torch.randn(shape, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


STAGES = ("compress", "finalize", "save", "load", "onnx")


JOINT_RATIO = 4.0  # the joint cell's size target (below it, BERT's embeddings alone exceed the budget)
# where 8-bit weights and fp16 BatchNorm (norm_format auto under a size target) already make a file
# under 4x, nothing would bind: a higher target there (also for the LSTM, whose file stayed 5% under a
# 4x target: its 4-bit weights alone are about 4.2x under fp32; ConvNeXt's file, every weight kept at
# 8 bits, ended 3.5% under 4x once its step sizes took one byte each, scale_format auto)
JOINT_RATIO_OF = {"resnet": 6.0, "mobilenetv2": 6.0, "torch-lstm": 6.0, "convnext": 5.0}
# the joint form (joint_form.py, what `mode: joint` trains under a size target) keeps 4-bit widths, which
# alone make a file about 8x under fp32: a target that binds, per architecture (the text encoders'
# embeddings, stored as they are, allow no more than 4x)
FORM_RATIO, FORM_RATIO_OF = 12.0, {name: JOINT_RATIO for name in TEXT}
JOINT_KINDS = ("joint", "joint_form")


def joint_ratio(kind: str, name: str) -> float:
    """The size target (fp32 file / ratio) of a joint cell."""
    return JOINT_RATIO_OF.get(name, JOINT_RATIO) if kind == "joint" else FORM_RATIO_OF.get(name, FORM_RATIO)


def _recipe(kind: str, name: str = "") -> dict:
    if kind == "joint":  # zero as a quantizer level, decided under one byte budget (size_budget)
        return {"mode": "joint", "target": {"ratio": joint_ratio(kind, name)}, "training": {"epochs": 2, "batch_size": 4, "lr": 1e-3},
                "techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True}, {"type": "size_budget"}]}
    if kind == "joint_form":  # a user's prune + quantize recipe under a size target: compress() trains its joint form
        return {"mode": "joint", "target": {"ratio": joint_ratio(kind, name)},
                "training": {"epochs": 2, "batch_size": 4, "lr": 1e-3},
                "techniques": [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4}]}
    prune = {"type": kind, "sparsity": 0.5, "end": 0.5}
    if kind == "prune_structured":
        prune["criterion"] = "magnitude"
    return {"training": {"epochs": 1, "batch_size": 4, "lr": 1e-3},
            "techniques": [prune, {"type": "quant_lsq", "bits": 8}]}


def rel_gap(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference - other).abs().max()) / max(float(reference.abs().max()), 1e-6)


def _shrunk_layers(model: nn.Module, fresh: nn.Module) -> int:
    """How many Linear/Conv layers have fewer parameters than in the unpruned model."""
    from jointcompress.layer_types import COMPRESSIBLE

    before = {n: m.weight.numel() for n, m in fresh.named_modules() if isinstance(m, COMPRESSIBLE)}
    return sum(1 for n, m in model.named_modules() if n in before and m.weight.numel() < before[n])


def _compress_detail(kind: str, first) -> str:
    if kind == "prune_structured":
        return f"{len(getattr(first, 'groups', []))} groups, {len(getattr(first, 'skipped', []))} layers skipped"
    if kind in JOINT_KINDS:
        return f"{len(first.quantizers)} layers with a dead zone"
    return f"sparsity {first.achieved_sparsity():.2f} over {len(first.masks)} layers"


def _against_target(kind: str, manifest: dict, name: str) -> str:
    """For a joint cell: the file against its target (the fp32 file / joint_ratio)."""
    if kind not in JOINT_KINDS:
        return ""
    from jointcompress.artifact.size import dense_fp32_bytes

    target = dense_fp32_bytes(build(name)) / joint_ratio(kind, name)
    return f", {100 * (manifest['weights_file_bytes'] / target - 1):+.1f}% vs the {target:,.0f} B target"


def run_cell(name: str, kind: str, workdir, tol: float = 1e-4, precision: str = "fp32") -> dict[str, tuple[str, str]]:
    """compress -> finalize -> save -> load -> ONNX for one architecture and pruning kind (trained in
    `precision`: training.precision).

    Returns stage -> ("ok", what was checked) or ("error", the JointCompressError message);
    a stage after a failed one is not run. Any other exception propagates (it is a bug).
    A parity beyond `tol` (relative) is an AssertionError.
    """
    from pathlib import Path

    from jointcompress import JointCompressError, compress, finalize
    from jointcompress.artifact import load, save
    from jointcompress.deploy.onnx_export import export_and_check

    out: dict[str, tuple[str, str]] = {}
    model, (x, y) = build(name), data(name)
    stage = "compress"
    try:
        recipe = _recipe(kind, name)
        recipe["training"]["precision"] = precision
        res = compress(model, recipe, (x, y), lambda m: 0.0)
        model.eval()
        with torch.no_grad():
            masked = model(x)
        out[stage] = ("ok", _compress_detail(kind, res.techniques[0]))
        stage = "finalize"
        spec = finalize(model, res.example_inputs)
        with torch.no_grad():
            final = model(x)
        gap = rel_gap(masked, final)
        assert gap <= tol, f"{name}/{kind}: finalize changed the logits by {gap:.3g} (relative)"
        shrunk = _shrunk_layers(model, build(name))
        assert kind != "prune_structured" or shrunk > 0, f"{name}: structured pruning removed nothing"
        out[stage] = ("ok", f"gap {gap:.1e}, {shrunk} layers shrunk")
        stage = "save"
        path = Path(workdir) / f"{name}-{kind}"
        manifest = save(model, spec, path / "artifact", builder=lambda: build(name), example_inputs=res.example_inputs)
        out[stage] = ("ok", f"{manifest['weights_file_bytes']} bytes" + _against_target(kind, manifest, name))
        stage = "load"
        loaded = load(path / "artifact", lambda: build(name))
        with torch.no_grad():
            gap = rel_gap(final, loaded(x))
        assert gap <= tol, f"{name}/{kind}: the loaded artifact differs by {gap:.3g} (relative)"
        out[stage] = ("ok", f"gap {gap:.1e}")
        stage = "onnx"
        report = export_and_check(model, path / "model.onnx", x[:2], eval_data=x)
        gap = report.max_abs_logit_diff / max(float(final.abs().max()), 1e-6)
        assert gap <= tol, f"{name}/{kind}: ONNX Runtime differs by {gap:.3g} (relative)"
        out[stage] = ("ok", f"gap {gap:.1e}")
    except JointCompressError as err:
        out[stage] = ("error", f"{type(err).__name__}: {err}")
    return out

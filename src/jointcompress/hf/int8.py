"""Real int8 CPU inference for HF classifiers, with a logits tolerance check.

Two back ends, because which is faster depends on the CPU and thread count (measured in
benchmarks/results/hf_sst2.md): torch dynamic int8 quantization of every nn.Linear
(weights int8 per tensor, activations quantized per batch at run time), and ONNX Runtime
dynamic int8 (MatMulInteger) on an exported ONNX graph. Both keep embeddings, LayerNorm
and softmax in fp32. A fake-quant (LSQ) model must have its parametrizations baked into
plain weights first (bake_parametrizations); the tolerance check then says how far the
real int8 kernels drift from the model that was trained.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from jointcompress.errors import ArtifactError
from jointcompress.model_call import model_device, to_device
from jointcompress.model_copy import load_model_state

INPUT_NAMES = ("input_ids", "attention_mask")


def bake_parametrizations(model: nn.Module) -> nn.Module:
    """Replace every parametrized weight by its current (e.g. fake-quantized) value, in place."""
    from torch.nn.utils import parametrize

    from jointcompress.techniques.norm_storage import detach_norm_storage

    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod):
            for name in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, name, leave_parametrized=True)
        detach_norm_storage(mod)
    return model


def baked_copy(model: nn.Module) -> nn.Module:
    """An independent copy of an HF model with parametrized weights replaced by their values.

    deepcopy cannot copy parametrized modules in this torch, and baking in place would
    destroy the latent weights of a model still being trained; so we rebuild the model
    from its config and load a state dict holding the computed weights.
    """
    from torch.nn.utils import parametrize

    if not any(parametrize.is_parametrized(m) for m in model.modules()):
        return copy.deepcopy(model)
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for prefix, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for pname in mod.parametrizations.keys():
                state[f"{prefix}.{pname}" if prefix else pname] = getattr(mod, pname).detach().clone()
    new = type(model)(copy.deepcopy(model.config))
    load_model_state(new, state, strict=True)
    return new.train(model.training)


def quantize_torch_int8(model: nn.Module) -> nn.Module:
    """A copy of model with all nn.Linear replaced by torch dynamic int8 Linear (CPU)."""
    import warnings

    model = baked_copy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    originals = dict(model.named_modules())
    for name, m in quantized.named_modules():  # the swap keeps a layer's hooks, not the input rounding they call
        rounding = getattr(originals.get(name), "input_quant", None)
        if rounding is not None and not hasattr(m, "input_quant"):
            m.input_quant = rounding
    return quantized


class _LogitsOnly(nn.Module):
    """Wraps an HF classifier so ONNX export sees tensors in, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **types).logits


def export_onnx(model: nn.Module, path: str | Path, seq_len: int = 64, token_types: bool = False) -> Path:
    """Export fp32 model to ONNX (inputs input_ids, attention_mask, with `token_types` also
    token_type_ids (sentence pairs); output logits).

    The batch axis is dynamic; the sequence length is fixed at seq_len (the traced mask
    code treats it as a constant), so feed inputs padded to exactly seq_len.
    """
    from jointcompress.techniques.quant_lsq import has_training_hooks

    if has_training_hooks(model):  # the copy below left the head and FFN masks out: the unpruned network, silently
        raise ArtifactError("export_onnx: the model still carries its training masks (forward pre-hooks); export the "
                            "model session.finalize() (or CompressionTrainer's finalize) made, where the masked heads "
                            "and neurons are removed")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = baked_copy(model).cpu().eval()  # ONNX Runtime runs on the CPU: a GPU model is exported from a copy there
    model.config._attn_implementation = "eager"  # sdpa's mask path traces poorly
    names = list(INPUT_NAMES) + (["token_type_ids"] if token_types else [])
    example = tuple(torch.ones(2, seq_len, dtype=torch.long) for _ in names)
    from jointcompress.deploy.onnx_export import onnx_log_quiet

    with onnx_log_quiet(), warnings.catch_warnings():  # the legacy exporter left torch's ONNX log on
        # the tracer's note on transformers' mask code (the sequence length is fixed at seq_len, as said above) and the
        # exporter's on advanced indexing (no negative indices in these graphs) were printed to every run's user
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        torch.onnx.export(
            _LogitsOnly(model), example, str(path), input_names=names, output_names=["logits"],
            dynamic_axes={**{name: {0: "batch"} for name in names}, "logits": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
    untranspose_gemm_weights(path)
    return path


def untranspose_gemm_weights(path: Path) -> int:
    """Rewrite every Gemm with transB=1 on a weight of its own as transB=0 on the stored transpose, in place;
    returns how many. The same product, but the weight's output channels are then on axis 1 in any
    version of ONNX Runtime's dynamic quantizer: before 1.32 it turned such a Gemm into a MatMul on a
    transposed copy under the weight's own name, so a per-channel override on axis 0 (the BERT pooler's,
    from trained_overrides) was refused ("unexpected axis. Expected 1, but got 0")."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in graph.initializer):
        return 0  # a model over protobuf's 2 GB keeps its weights beside the file; left as exported
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0  # If / Loop bodies may read a weight too: its uses are not all counted here
    initializers = {init.name: init for init in graph.initializer}
    uses: dict[str, int] = {}
    for name in [i for node in graph.node for i in node.input] + [v.name for v in (*graph.input, *graph.output)]:
        uses[name] = uses.get(name, 0) + 1  # a graph input or output keeps its stored layout
    changed = 0
    for node in graph.node:
        trans_b = next((a for a in node.attribute if a.name == "transB"), None)
        if node.op_type != "Gemm" or trans_b is None or trans_b.i != 1 or len(node.input) < 2:
            continue
        weight = initializers.get(node.input[1])
        if weight is None or uses[weight.name] != 1 or len(weight.dims) != 2:
            continue
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), weight.name))
        trans_b.i = 0
        changed += 1
    if changed:
        onnx.save(model, str(path))
    return changed


def quantize_onnx_int8(src: str | Path, dst: str | Path, overrides: dict | None = None) -> Path:
    """ONNX Runtime dynamic int8 quantization (int8 weights, per-channel) of src into dst.

    `overrides` (from trained_overrides: the finalized model and its CompressionSpec) keeps
    the trained step sizes of every weight LSQ trained at <= 8 bits, so the int8 weights ORT
    runs are exactly the trained integers; other weights get ORT's own min/max scales.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from jointcompress.deploy.int8 import quiet_quantizer_logs

    extra = {}
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    with quiet_quantizer_logs():  # its generic "consider pre-processing" line on every call read as a problem
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, extra_options=extra)
    return Path(dst)


def trained_overrides(onnx_path: str | Path, model: nn.Module | None, spec) -> dict:
    """TensorQuantOverrides for the ONNX initializers holding LSQ-trained weights (bits <= 8)."""
    if model is None or spec is None:
        return {}
    from jointcompress.deploy.int8 import weight_overrides

    modules = dict(model.named_modules())
    # embedding tables (rounded per row after training, in a loaded artifact's spec) run as ONNX Gather, which
    # ONNX Runtime quantizes per tensor only: per-row overrides stopped quantize_onnx_int8
    scales = {name: ls.scale.detach().float().reshape(-1).cpu().numpy() for name, ls in spec.layers.items()
              if ls.bits is not None and ls.bits <= 8 and ls.scale is not None
              and not isinstance(modules.get(name), nn.Embedding)}
    return weight_overrides(Path(onnx_path), model, scales)


class OrtClassifier:
    """Callable ONNX Runtime session returning logits as a torch tensor."""

    def __init__(self, path: str | Path, threads: int | None = None):
        from jointcompress.deploy.timing import DEFAULT_THREADS, ort_session

        if not Path(path).is_file():
            raise ArtifactError(f"ONNX file {path} does not exist; run export_onnx / quantize_onnx_int8 first")
        self.session = ort_session(path, threads or DEFAULT_THREADS)  # spinning off (deploy.timing)
        self.takes_types = "token_type_ids" in {i.name for i in self.session.get_inputs()}

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                 **_) -> torch.Tensor:
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        if self.takes_types:  # a sentence-pair model; one segment where none is given (the latency's rows)
            feeds["token_type_ids"] = (token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)).numpy()
        return torch.from_numpy(self.session.run(["logits"], feeds)[0])


def torch_logits_fn(model: nn.Module):
    """Callable (input_ids, attention_mask[, token_type_ids]) -> logits for a torch model, no grad."""

    @torch.no_grad()
    def run(input_ids, attention_mask, token_type_ids=None, **_):
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        inputs = to_device({"input_ids": input_ids, "attention_mask": attention_mask, **types}, model_device(model))
        return model(**inputs).logits.cpu()

    return run


def logits_over(fn, tensors: dict[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """fn's logits for all rows (fixed padding, so every back end sees identical inputs); the token
    types go along where a row has a second segment (sentence pairs)."""
    n = tensors["input_ids"].shape[0]
    from jointcompress.hf.wrapper import pair_types

    types = pair_types(tensors)
    outs = [fn(tensors["input_ids"][i:i + batch_size], tensors["attention_mask"][i:i + batch_size],
               *([] if types is None else [types[i:i + batch_size]]))
            for i in range(0, n, batch_size)]
    return torch.cat(outs).float()


def check_logits(reference: torch.Tensor, candidate: torch.Tensor, atol: float) -> dict:
    """Compare int8 logits with the float (or fake-quant) model's; raise if max |diff| > atol.

    Returns max/mean absolute difference and the fraction of rows whose argmax agrees.
    """
    diff = (reference - candidate).abs()
    stats = {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "argmax_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).float().mean()),
        "atol": atol,
    }
    if stats["max_abs_diff"] > atol:
        raise ArtifactError(
            f"int8 logits differ from the float model by {stats['max_abs_diff']:.4f} > tolerance {atol}; "
            "quantization-aware training (quant_lsq) or a looser int8 tolerance is needed"
        )
    return stats


def latency_samples(fn, batch_size: int, seq_len: int = 64, repeats: int = 20, warmup: int = 3,
                    vocab: int = 1000) -> list[float]:
    """Sorted wall times (ms) of calls at [batch_size, seq_len] full-length inputs."""
    g = torch.Generator().manual_seed(0)
    low = min(100, vocab // 2)  # skip the special / unused ids at the start of real vocabularies
    ids = torch.randint(low, vocab, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    for _ in range(warmup):
        fn(ids, mask)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(ids, mask)
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)


def latency_ms(fn, batch_size: int, seq_len: int = 64, repeats: int = 20, warmup: int = 3,
               vocab: int = 1000, stat: str = "median") -> float:
    """Median (or min) latency in ms; see latency_samples.

    min is the better estimate of the achievable latency on a shared, noisy machine;
    median is what a user sees under that load. Report both when the CPU is shared.
    """
    times = latency_samples(fn, batch_size, seq_len, repeats, warmup, vocab)
    return times[0] if stat == "min" else times[len(times) // 2]


def random_rows(batch_size: int, seq_len: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-length rows of random ids (the same for every back end: seeded)."""
    g = torch.Generator().manual_seed(0)
    low = min(100, vocab // 2)  # skip the special / unused ids at the start of real vocabularies
    ids = torch.randint(low, vocab, (batch_size, seq_len), generator=g)
    return ids, torch.ones_like(ids)


def interleaved_latency(fns: dict, seq_len: int, rounds: int, threads: int = 1) -> dict:
    """Median latency (ms) at batch 1 and 32, timed the honest way (deploy.timing).

    `fns`: name -> (callable(input_ids, attention_mask), vocab size). Every back end runs with
    `threads` threads (ORT sessions must come from OrtClassifier(..., threads)); rounds
    alternate the back ends; each is also timed alone, and a disagreement over 20% is
    listed under "flagged".
    """
    from jointcompress.deploy.timing import time_contenders

    res: dict = {name: {} for name in fns}
    flagged = []
    for bs, reps in ((1, 10), (32, 3)):
        inputs = {name: random_rows(bs, seq_len, vocab) for name, (_, vocab) in fns.items()}
        timing = time_contenders({name: (lambda f=fn, a=inputs[name]: f(*a)) for name, (fn, _) in fns.items()},
                                 threads=threads, rounds=max(1, rounds) * reps, warmup=2)
        for name in fns:
            res[name][f"batch{bs}_ms"] = round(timing.interleaved_ms[name], 3)
            res[name][f"batch{bs}_alone_ms"] = round(timing.alone_ms[name], 3)
        flagged += [f"{name} (batch {bs})" for name in timing.flagged]
    res["flagged"] = flagged
    return res

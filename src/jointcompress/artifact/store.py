"""Save and load a deployable artifact: a directory with a weights file + manifest.json.

Why this layout: the weights file (container.py, or safetensors on request) and JSON cannot
execute code when read (no pickle anywhere), the manifest is human-readable, and everything
needed to check the weights file (exact byte count of every part, sha256, format version) is
stated before a single byte is trusted. The default container (weights.jcw) adds a few dozen
bytes to the parts; `save(..., container="safetensors")` writes the same parts as a
weights.safetensors that standard tools read (other tensors natively). Version-1 artifacts
(safetensors, fp32 scales and biases) still load. Both
files are written atomically (temp file + os.replace), weights first and manifest last, so a
crash mid-save leaves either the old artifact or a manifest whose sha256 no longer matches
(and `load` says so) -- never a silently half-written model. Two files cannot be replaced in one
atomic step, so an overwrite first links the artifact it replaces under `.previous.` names and
removes them only once the new pair is complete: a save killed halfway loses nothing.

The shrunken architecture is not pickled either: the manifest stores Torch-Pruning's pruning
history, and `load` replays it on the dense model the caller's `builder` returns.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import ArtifactError, UnsupportedModelError
from ..io import atomic_write_bytes
from ..model_copy import load_model_state
from ..session.checks import unsized_lazy
from ..spec import PRIOR_STRUCTURE, CompressionSpec, LayerSpec
from . import container as _container
from . import encode as _enc
from . import entropy as _entropy
from . import packing as _packing
from . import precision as _precision

FORMAT = "jointcompress-artifact"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONTAINERS = {"jcw": "weights.jcw", "safetensors": "weights.safetensors"}
WEIGHTS_FILE = CONTAINERS["jcw"]
MANIFEST_FILE = "manifest.json"
PREVIOUS = ".previous."  # prefix of the artifact an overwrite replaces, kept until the new one is whole
WEIGHTS_METADATA = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}  # the safetensors __metadata__
MAX_INPUT_NUMEL = 1 << 26  # per example input: the dummy tensors load() builds to replay the pruning history


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("jointcompress")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


def weights_blob(tensors: dict[str, torch.Tensor]) -> bytes:
    """The exact bytes of weights.safetensors for `tensors`: byte-identical for identical input.

    safetensors (0.8) writes the ``__metadata__`` keys in Rust HashMap order, which changes
    between calls and processes, so its output is not reproducible as is. The header is
    re-serialized here with ``__metadata__`` sorted, in the same compact JSON and the same
    length (tensor entries, offsets and data untouched), so the file still reads with any
    safetensors and its size is the one safetensors reports. Use this (not ``st_save``) wherever
    the on-disk size of an artifact is predicted.
    """
    from safetensors.torch import save as st_save

    blob = st_save(tensors, metadata=dict(WEIGHTS_METADATA))
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    new_len = header_len if len(text) <= header_len else (len(text) + 7) // 8 * 8
    text = text.ljust(new_len, b" ")  # safetensors pads its header with spaces to a multiple of 8
    return struct.pack("<Q", new_len) + text + blob[8 + header_len:]


def safetensors_tensors(enc: "_enc.Encoding") -> dict[str, torch.Tensor]:
    """The safetensors container's tensors: every layer part as 1-D uint8, other tensors as they are."""
    tensors = {k: torch.frombuffer(bytearray(v), dtype=torch.uint8) if v else torch.zeros(0, dtype=torch.uint8)
               for k, v in enc.parts.items() if k not in enc.others}
    tensors.update(enc.tensors)
    return tensors


def file_blob(enc: "_enc.Encoding", container: str = "jcw") -> bytes:
    """The exact bytes of the weights file `save` writes for this encoding (what the size
    allocator measures)."""
    if container == "jcw":
        return _container.pack(list(enc.parts.values()))
    if container == "safetensors":
        return weights_blob(safetensors_tensors(enc))
    raise ArtifactError(f"container={container!r}: choose one of {sorted(CONTAINERS)}")


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _input_records(example_inputs) -> list[dict]:
    """Shape and dtype of each example input (and its name, for inputs given by name)."""
    if isinstance(example_inputs, dict):
        return [{"name": k, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                for k, t in example_inputs.items()]
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in _as_tuple(example_inputs)]


def inputs_of_records(records: list[dict], batch: int | None = None, floats=torch.zeros):
    """Inputs of the recorded shapes (`batch` rows instead of the recorded ones where given): zeros, or
    `floats(shape, dtype=...)` for floating inputs; a dict where the inputs were named, else a tuple."""
    made = []
    for r in records:
        dtype, shape = getattr(torch, r["dtype"]), list(r["shape"]) if batch is None else [batch, *r["shape"][1:]]
        made.append((floats if dtype.is_floating_point else torch.zeros)(shape, dtype=dtype))
    if records and all("name" in r for r in records):
        return {r["name"]: t for r, t in zip(records, made)}
    return tuple(made)


def _history_json(history) -> list[list]:
    return [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in history]


def _built(builder: Callable[[], nn.Module], where: str) -> nn.Module:
    """builder(), checked to be a model: one that returned None (a missing `return`) failed deep inside the load."""
    model = builder()
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"{where}: the builder returned {type(model).__name__}, not a torch.nn.Module (a missing "
                            "`return`?); give a function that returns a fresh model of the architecture that was saved")
    return model


def rebuild(builder: Callable[[], nn.Module], history: list, records: list[dict], where: str,
            dropped: list[str] = (), later_dropped: list = (), strides: dict | None = None) -> nn.Module:
    """A fresh model from `builder`, with its dropped blocks removed and the recorded structured
    pruning replayed on it (on inputs of the example input `records`, made only where needed: the
    replay, or lazy layers to size); `later_dropped`: [(n, names)], blocks removed once the first n
    history entries are replayed (a later run's, on a model an earlier run had shrunk); `strides`: the
    convolutions raise_stride downsampled with (weights keep their shapes: set last)."""
    model = _built(builder, where)
    needs_inputs = bool(history) or bool(unsized_lazy(model))
    inputs = _recorded_inputs(records, where) if needs_inputs else ()
    _size_lazy_layers(model, inputs, where)
    _drop(model, dropped, where)
    start = 0
    for n, names in sorted((int(n), names) for n, names in later_dropped):
        _replay(model, history[start:n], inputs, where)
        _drop(model, names, where)
        start = max(start, n)
    _replay(model, history[start:], inputs, where)
    if strides:
        from ..strides import set_strides

        try:
            set_strides(model, strides, where)
        except UnsupportedModelError as exc:
            raise ArtifactError(f"{exc}; is the builder the same architecture the artifact was trained from?") from exc
    return model


def _recorded_inputs(records: list[dict], where: str):
    """Inputs of the recorded example input shapes (zeros), for the replay and for sizing lazy layers."""
    try:
        return inputs_of_records(records)
    except Exception as exc:  # e.g. a dtype torch.zeros cannot make (quantized)
        raise ArtifactError(f"{where}: the manifest's field example_inputs cannot be turned into tensors "
                            f"({type(exc).__name__}: {exc})") from exc


def _size_lazy_layers(model: nn.Module, inputs, where: str) -> None:
    """A builder with lazy layers (nn.LazyLinear, ...) returns them unsized; they take their shapes on the first
    call, which the recorded example inputs make (zeros, in eval mode). Without it the weights could not be
    loaded into them and the user's own builder could never load the artifact."""
    from ..model_call import call_model, evaluating

    unsized = unsized_lazy(model)
    if not unsized:
        return
    if not inputs:
        raise ArtifactError(f"{where}: the builder's model has lazy layers not sized yet ('{unsized[0]}'), and no "
                            "example inputs were recorded to size them with: save with example_inputs=... (a batch of "
                            "inputs), or make the builder call the model once on an example batch before returning it")
    with torch.no_grad(), evaluating(model):
        call_model(model, inputs)


def _drop(model: nn.Module, names: list[str], where: str) -> None:
    if not names:
        return
    from ..block_drop import drop_blocks

    try:
        drop_blocks(model, list(names))
    except AttributeError as exc:
        raise ArtifactError(f"{where}: dropped block {exc} is not a module of the builder's model; is the builder "
                            "the same architecture the artifact was trained from?") from exc


def _replay(model: nn.Module, history: list, inputs: tuple, where: str) -> None:
    """Torch-Pruning's replay of `history` on the model as it is now (its graph traced afresh)."""
    if not history:
        return
    from ..graph import build_graph, frozen_stay_frozen
    from ..model_call import call_model, evaluating

    try:
        with frozen_stay_frozen(model):
            dg = build_graph(model, inputs if isinstance(inputs, dict) or len(inputs) != 1 else inputs[0])
            dg.load_pruning_history(_history_json(history))
        with torch.no_grad(), evaluating(model):  # an index past a layer's channels left it inconsistent (a
            call_model(model, inputs)  # depthwise conv's groups 7 over 8 channels), found at the first call
    except Exception as exc:
        # a graph that cannot be traced says so with advice for training (which techniques to use instead),
        # which does not apply here: the error under it is what failed
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        first = str(cause).splitlines()[0][:300] if str(cause) else ""
        raise ArtifactError(
            f"{where}: replaying the pruning history on the builder's model failed ({type(cause).__name__}: {first}); "
            "is the builder the same architecture the artifact was trained from? (a built-in model's sizes come from "
            "--data: give the images it was made for)"
        ) from exc


_CONVERTED_RNN = re.compile(r"(.+)\.(ih|hh)_l\d+(_reverse)?\.weight$")  # recurrent.LinearRNN's Linear layers
_TORCH_RNN = re.compile(r"(.+)\.weight_(ih|hh)_l\d+(_reverse)?$")  # nn.LSTM / GRU / RNN's loose weights


def _recurrent_fix(expected: dict, actual: dict) -> str | None:
    """check_shapes' advice where a recurrent module was compressed as Linear layers (recurrent.rnn_to_linear)
    and the builder's model holds torch's own module there. None where no such module differs."""
    def owners(names, pattern):
        return {m.group(1) for k in names if (m := pattern.match(k))}

    converted_in_artifact = sorted(owners(expected, _CONVERTED_RNN) & owners(actual, _TORCH_RNN))
    if converted_in_artifact:
        return (f"the artifact holds {', '.join(converted_in_artifact[:3])} as Linear layers (converted by "
                "jointcompress.recurrent.rnn_to_linear before compressing) and the builder's model as torch's "
                "recurrent module: apply rnn_to_linear(model) in the builder, with the merge_biases the run used "
                "(linear_to_rnn(model) after loading gives torch's fused module back)")
    return None


def _transformers_fix(model: nn.Module, expected: dict, actual: dict) -> str | None:
    """check_shapes' advice for a transformers model of a family jointcompress.hf prunes (None for any
    other model: the image-model advice stands); where the artifact's FFN widths differ from the builder's
    model's, it names them and the builder that builds them."""
    hf = getattr(model, "hf", model)
    if not isinstance(getattr(getattr(hf, "config", None), "model_type", None), str):
        return None  # not a transformers model (jointcompress.hf needs transformers, an optional dependency)
    from ..hf.modeling_pruned import ARCH, FAMILY_OF, family, layers as hf_layers

    if hf.config.model_type not in FAMILY_OF:
        return None
    conv1d = _conv1d_module(model)
    if conv1d is not None:  # GPT-2's Conv1D is stored [in, out]: its shapes read as widths gave wrong advice
        return (f"the builder's model holds transformers' Conv1D projections ({conv1d}, weights stored [in, out]) where "
                "the compressed model had nn.Linear: return jointcompress.hf.causal.conv1d_to_linear(model) from the "
                "builder, as the model was converted before compressing (docs/transformers.md)")
    hf_load = ("an artifact written by jointcompress.hf.artifact.save_hf_artifact loads with "
               "jointcompress.hf.artifact.load_hf_artifact(path), which rebuilds its pruned heads and FFN widths "
               "from its manifest (docs/transformers.md)")
    try:  # a layer's FFN width: the rows of its FFN input projection (an nn.Linear's [width, hidden])
        stack = hf_layers(hf)
        prefix = next(n for n, m in model.named_modules() if m is stack)
        keys = [f"{prefix}.{i}.{ARCH[family(hf.config)]['ffn_in']}.weight" for i in range(len(stack))]
        stored = [expected[k][0] for k in keys]
        built = [actual[k][0] for k in keys]
    except (StopIteration, AttributeError, KeyError, IndexError, ValueError):
        stored = built = []
    if not stored or stored == built:
        return f"pass a builder of the transformers model the artifact was made from (the same config); {hf_load}"
    return (f"the artifact's FFN widths are {stored} (per layer), the builder's model's {built}: build the pruned "
            f"widths with builder = jointcompress.hf.causal.with_ffn_widths(build, {stored}) (the finalized "
            "model's config.intermediate_per_layer; docs/your-model.md), or, for an artifact written by "
            "jointcompress.hf.artifact.save_hf_artifact, load it with jointcompress.hf.artifact.load_hf_artifact("
            "path), which rebuilds them from its manifest (docs/transformers.md)")


def _conv1d_module(model: nn.Module) -> str | None:
    """The name of the first transformers Conv1D (GPT-2's projections) in the model, else None."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return next((name for name, m in model.named_modules() if isinstance(m, Conv1D)), None)


def check_shapes(model: nn.Module, layers: dict, others: dict, where: str, aliases: dict | None = None) -> None:
    """Every stored tensor must exist in the rebuilt model with the same shape, and vice versa."""
    expected = {f"{n}.weight": tuple(r["shape"]) for n, r in layers.items()}
    expected.update({f"{n}.bias": (r["shape"][0],) for n, r in layers.items() if "bias" in r["parts"]})
    expected.update({k: tuple(r["shape"]) for k, r in others.items()})
    expected.update({k: expected[src] for k, src in (aliases or {}).items() if src in expected})
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(actual) - set(expected))
    unexpected = sorted(set(expected) - set(actual))
    wrong = [f"{k}: artifact {expected[k]} vs model {actual[k]}" for k in sorted(set(expected) & set(actual))
             if expected[k] != actual[k]]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:5]))
        if missing:
            parts.append(f"model tensors not in the artifact: {missing[:5]}")
        if unexpected:
            parts.append(f"artifact tensors not in the model: {unexpected[:5]}")
        raise ArtifactError(
            f"{where}: the artifact does not fit the builder's model ({'; '.join(parts)}); "
            + (_transformers_fix(model, expected, actual) or _recurrent_fix(expected, actual)
               or "pass the builder of the architecture the artifact was made from (e.g. the right --model, and "
                  "--data of the images it was made for: a built-in model's sizes come from them)"))


def save(
    model: nn.Module,
    spec: CompressionSpec,
    path: str | os.PathLike,
    builder: Callable[[], nn.Module] | None = None,
    example_inputs=None,
    extra: dict[str, Any] | None = None,
    entropy: bool = True,
    container: str = "jcw",
) -> dict:
    """Write the artifact directory `path` and return its manifest.

    `example_inputs` fixes the input shape used to replay the pruning history at load time
    (required when the spec has a pruning history; default: the batch finalize traced with) and to size a
    builder's lazy layers (nn.LazyLinear, ...) there. With a `builder`, the replay is checked
    now against `model`, so an artifact that could not be loaded is never written.
    `entropy` codes each packed part with zstd or ans where that makes it smaller.
    `container`: "jcw" (compact, the default) or "safetensors" (readable by standard tools).
    """
    path = Path(path)
    if container not in CONTAINERS:
        raise ArtifactError(f"container={container!r}: choose one of {sorted(CONTAINERS)}")
    if not isinstance(spec, CompressionSpec):
        raise ArtifactError(f"save(model, spec, path): spec is {type(spec).__name__}, not the CompressionSpec "
                            "finalize returns; spec = session.finalize() (or result.finalize() after compress), then "
                            "save(model, spec, path)")
    from ..session.checks import attached_layers

    live = attached_layers(model)
    if live:
        raise ArtifactError(f"save: {len(live)} layers ({', '.join(live[:3])}) still carry their masks or quantizers: "
                            "save the model finalize returned the spec for (spec = session.finalize() bakes them into "
                            "plain weights in place), not a copy taken before it")
    existing = next(p for p in (path, *path.parents) if p.exists())  # the folder is made at the end: said now
    if not existing.is_dir():
        raise ArtifactError(f"{path}: an artifact is a folder (the weights file and manifest.json go inside), and "
                            f"{existing} is a file; give a folder path that is not one")
    history = _history_json(spec.pruning_history or [])
    example_inputs = spec.example_inputs if example_inputs is None else example_inputs  # finalize's batch
    if history and example_inputs is None:
        raise ArtifactError(f"{path}: save() needs example_inputs to record how to replay the pruning history")
    dropped = [str(n) for n in getattr(spec, "dropped_blocks", [])]
    later = [[int(n), [str(b) for b in names]] for n, names in getattr(spec, "later_dropped_blocks", [])]
    strides = {str(k): [int(s) for s in v] for k, v in getattr(spec, "strides", {}).items()}
    inputs = _input_records(example_inputs)
    _refuse_nonfinite(model, path)
    encoding = _enc.encode_model(model, spec, entropy=entropy)
    if builder is not None:
        rebuilt = rebuild(builder, history, inputs, str(path), dropped, later, strides)
        check_shapes(rebuilt, encoding.layers, encoding.others, f"{path} (checked at save time)", encoding.aliases)
    blob = file_blob(encoding, container)
    _warn_over_target(spec, len(blob), path, container, encoding, _recipe_goal(spec, model))
    totals = encoding.totals()
    if container == "safetensors" and len(blob) < totals["total"]:
        raise ArtifactError(f"{path}: safetensors wrote {len(blob)} bytes, fewer than the {totals['total']} of its parts")
    manifest = _manifest(spec, container, blob, encoding, inputs, history, dropped, later, strides, extra)
    _validate(manifest, path / MANIFEST_FILE, saving=True)  # what load will check: a manifest it would refuse is never written
    _write_files(path, container, blob, manifest)
    return manifest


def _manifest(spec: CompressionSpec, container: str, blob: bytes, encoding, inputs, history, dropped: list,
              later: list, strides: dict, extra: dict | None) -> dict:
    """The manifest of an encoded model: what load checks and replays, with both digests."""
    totals = encoding.totals()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "torch_version": torch.__version__,
        "recipe": spec.recipe,
        "container": container,
        "weights_file": CONTAINERS[container],
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "weights_file_bytes": len(blob),
        "bytes": {**totals, "container": len(blob) - totals["total"], "file": len(blob)},
        "blob_keys": list(encoding.parts),
        "example_inputs": inputs,
        "pruning_history": history,
        "dropped_blocks": dropped,
        "layers": encoding.layers,
        "other_tensors": encoding.others,
        "extra": extra or {},
    }
    if later:  # only where a later run dropped blocks: every other manifest stays as it was
        manifest["later_dropped_blocks"] = later
    if strides:  # only where raise_stride downsampled a layer
        manifest["strides"] = strides
    if encoding.aliases:  # only where a tensor is held under two names (encode.unique_state)
        manifest["aliases"] = encoding.aliases
    if getattr(spec, "folded_norms", None):  # only where BatchNorm layers are stored folded (norm_format: fp16_folded)
        manifest["folded_norms"] = list(spec.folded_norms)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    return manifest


def _write_files(path: Path, container: str, blob: bytes, manifest: dict) -> None:
    """Weights then manifest, each written atomically; the previous artifact's files are kept
    until the new one is whole, so a save killed halfway loses nothing."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # said as a failed write is (io.atomic_write_bytes), not as the OS's bare words
        raise type(err)(err.errno, f"creating {path} failed: {err.strerror or err}; nothing was written",
                        str(path)) from err
    stale = _refuse_users_files(path, CONTAINERS[container])
    for left in _save_leftovers(path):  # an earlier save killed halfway; this one replaces what it was writing
        left.unlink(missing_ok=True)
    _keep_previous(path)
    atomic_write_bytes(path / CONTAINERS[container], blob)
    if stale is not None:  # the earlier artifact's weights, in the other container
        stale.unlink(missing_ok=True)
    # compact: indented, a small model's manifest outweighed its weights file (10.3 KB beside 2.2 KB; 7.3 KB compact)
    atomic_write_bytes(path / MANIFEST_FILE, (json.dumps(manifest, sort_keys=True, separators=(",", ":")) + "\n").encode())
    for kept in _previous_files(path):  # the new artifact is whole
        kept.unlink(missing_ok=True)


def _refuse_users_files(path: Path, weights_name: str) -> Path | None:
    """A save writes weights.jcw (or weights.safetensors) and manifest.json, replacing an earlier artifact's: in a
    folder whose manifest.json is none of ours, files of those names are the user's (a model's weights.safetensors,
    their own manifest), and the save deleted or replaced them without a word. Refused, naming them. Returns the
    earlier artifact's weights file in the other container, which the new one replaces (None where there is none)."""
    earlier = _json_or_none(path / MANIFEST_FILE)
    ours = isinstance(earlier, dict) and earlier.get("format") == FORMAT
    named = earlier.get("weights_file") if ours else None
    theirs = [MANIFEST_FILE] if (path / MANIFEST_FILE).exists() and not ours else []
    tensors = path / CONTAINERS["safetensors"]  # weights.jcw is this package's format: one alone is a save killed early
    if tensors.exists() and named != tensors.name and not _ours_safetensors(tensors):
        theirs.append(tensors.name)
    if theirs:
        raise ArtifactError(f"{path}: holds {' and '.join(theirs)}, which no save of this package wrote, and a save writes "
                            "files of those names; save into another folder, or move them out first")
    return path / named if named in CONTAINERS.values() and named != weights_name and (path / named).is_file() else None


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None


def _ours_safetensors(path: Path) -> bool:
    """Whether a safetensors file is an artifact's weights (its metadata names this package's format)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - not readable as safetensors: not ours
        return False


def _recipe_goal(spec: CompressionSpec, model: nn.Module) -> float | None:
    """The bytes the recipe's size target asked for: size_budget's (the joint form), else the target's
    own (a sequential or overlap run, which the allocator and the steering meet: a file over it was said by
    compress(), and written by save without a word). A ratio is of the model's fp32 file, which finalizing
    unstructured masks and quantizers does not change (those modes remove no channels under a size target)."""
    from pydantic import ValidationError

    from ..recipe import Target
    from ..targets import target_bytes

    recipe = spec.recipe or {}
    budget = next((t for t in recipe.get("techniques", []) if t.get("type") == "size_budget"), {})
    if budget.get("target_bytes"):
        return float(budget["target_bytes"])
    try:
        target = Target.model_validate(recipe["target"]) if recipe.get("target") else None
    except ValidationError:  # a recipe recorded by another version: no goal to hold the file to
        return None
    reshaped = getattr(spec, "pruning_history", None) or getattr(spec, "dropped_blocks", None)
    if target is None or target.is_latency or (target.ratio and reshaped):  # the fp32 file before the cuts is unknown
        return None
    return target_bytes(model, target)


def _warn_over_target(spec: CompressionSpec, size: int, path: Path, container: str = "jcw", encoding=None,
                      target: float | None = None) -> None:
    """The run's size budget measures the file at its checks; the values fine-tuned after its freeze can code
    to a few more bytes, and a target just above one weight per live channel cannot be cut under. The file
    written is what counts: one over the recipe's target (as the spec records it) is said here. The budget
    measures the default container: a safetensors file over the target whose jcw file is not (its header
    names every tensor: 5-44% more on small models) is said as that, not as a budget that missed."""
    if not target or size <= target:
        return
    over = f"{path}: the weights file is {size:,} B, {size - target:,.0f} B ({size / target - 1:.2%}) over the size target's {target:,.0f} B"
    compact = len(file_blob(encoding, "jcw")) if container != "jcw" and encoding is not None else None
    if compact is not None and compact <= target:
        warnings.warn(f"{over}: the target is measured in the default container, where this model's file is {compact:,} B; "
                      f"{container} adds its header (each tensor's name, dtype and shape). Save with container='jcw' for a "
                      "file on the target", stacklevel=3)
        return
    warnings.warn(f"{over} (the values trained after the run's last size check code to more bytes, or the target is under "
                  "what one weight per live channel costs); ask for a slightly larger file or a lower target.ratio, or lower "
                  "quant_lsq.bits", stacklevel=3)


def _refuse_nonfinite(model: nn.Module, path: Path) -> None:
    """A model whose parameters hold NaN or inf (a non-finite training step) would load as one whose outputs
    are not numbers; an earlier artifact in `path` is worth more than that."""
    from ..session.checks import nonfinite_tensors

    bad = nonfinite_tensors(model.named_parameters())
    if bad:
        raise ArtifactError(f"{path}: not saved: {len(bad)} parameter(s) hold NaN or inf ({', '.join(bad[:4])}"
                            f"{', ...' if len(bad) > 4 else ''}), so the model's outputs are not numbers; train again "
                            "from a clean copy (check the data for NaN, lower the learning rate)")


def _whole_artifact_files(path: Path) -> list[Path]:
    """[weights file, manifest] of the artifact in `path` if the two agree (its weights match the manifest's
    sha256), else []: a folder with no artifact, or one a killed save left half replaced."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        name = manifest["weights_file"]
        _check_weights_file(name)
        whole = hashlib.sha256((path / name).read_bytes()).hexdigest() == manifest["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError, _Bad):
        return []
    return [path / name, path / MANIFEST_FILE] if whole else []


def _keep_previous(path: Path) -> None:
    """Before an overwrite, link the whole artifact in `path` under `.previous.` names (weights first). A
    half-replaced pair keeps the backups already there: they hold the last whole artifact."""
    files = _whole_artifact_files(path)
    if not files:
        return
    for kept in _previous_files(path):
        kept.unlink(missing_ok=True)
    for f in files:
        try:
            os.link(f, path / (PREVIOUS + f.name))
        except OSError:  # a file system without hard links
            shutil.copy2(f, path / (PREVIOUS + f.name))


def _previous_files(path: Path) -> list[Path]:
    names = [*CONTAINERS.values(), MANIFEST_FILE]
    return [p for name in names if (p := path / (PREVIOUS + name)).is_file()]


def _save_leftovers(path: Path) -> list[Path]:
    """Temporary files a killed save left in the artifact folder (io.atomic_write_bytes names them so)."""
    names = [*CONTAINERS.values(), MANIFEST_FILE]
    return sorted(p for name in names for p in path.glob(f".{name}.*.tmp") if p.is_file())


def read_manifest(path: str | os.PathLike) -> dict:
    """Parse, version-check and structure-check manifest.json; raises ArtifactError naming the file."""
    if Path(path).is_file():
        raise ArtifactError(f"{path}: is a file; pass the artifact directory (the folder that holds {MANIFEST_FILE} "
                            "and the weights file)")
    if not Path(path).exists():
        raise ArtifactError(f"{path}: no such folder; pass the artifact directory save() wrote (OUT/artifact of a "
                            "compress run)")
    mpath = Path(path) / MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError as exc:
        # a run folder holds artifact/; a compare folder, runs/<point>/artifact/
        inside = sorted(p.parent for pattern in (f"*/{MANIFEST_FILE}", f"runs/*/*/{MANIFEST_FILE}")
                        for p in Path(path).glob(pattern))
        hint = (f"; {path} is a run's folder: its artifact is {inside[0]}" if len(inside) == 1
                else f"; the artifacts in it ({len(inside)}): {', '.join(str(p) for p in inside[:4])}"
                + (" ..." if len(inside) > 4 else "") if inside else "")
        raise ArtifactError(f"{mpath}: not found; is {path} an artifact directory written by save()?{hint}") from exc
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, or a number past int's digit limit
        raise ArtifactError(f"{mpath}: not valid JSON ({str(exc)[:200]}); the file is truncated or corrupted") from exc
    except RecursionError as exc:  # absurdly deep nesting
        raise ArtifactError(f"{mpath}: JSON nested too deeply; the file is corrupted") from exc
    except OSError as exc:  # a directory of that name, no permission, ...
        raise ArtifactError(f"{mpath}: cannot be read ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a {FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS or isinstance(manifest.get("format_version"), bool):
        raise ArtifactError(
            f"{mpath}: format_version {manifest.get('format_version')!r} is not supported by this "
            f"jointcompress ({package_version()}, reads versions {list(READABLE_VERSIONS)}); use the version that "
            f"wrote it ({manifest.get('package_version')!r})"
        )
    if manifest["format_version"] == 1:
        _upgrade_v1(manifest)
    elif "manifest_sha256" not in manifest:
        _say_manifest_unchecked(mpath)
    for key in ("weights_sha256", "weights_file_bytes", "layers", "other_tensors", "pruning_history", "example_inputs"):
        if key not in manifest:
            raise ArtifactError(f"{mpath}: field {key!r} is missing")
    _validate(manifest, mpath)
    if "manifest_sha256" in manifest and manifest["manifest_sha256"] != manifest_digest(manifest):
        raise ArtifactError(f"{mpath}: its content does not match its own checksum (manifest_sha256): it was edited or "
                            "corrupted after save (a swapped part name or pruning index loads as a wrong model); save "
                            "the model again")
    return manifest


def _say_manifest_unchecked(mpath: Path) -> None:
    """A format-2 manifest without its own checksum: written before save() signed it, or stripped of it. Loaded (the
    weights file is still checked against weights_sha256), with a warning, not silently: an edit to it (a swapped
    part name, a pruning index) is no longer caught."""
    warnings.warn(f"{mpath}: has no manifest_sha256, so edits to it after save cannot be caught (the weights file is "
                  "still checked); it was written by an earlier jointcompress or the field was removed; save the model "
                  "again to sign it", stacklevel=3)


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content as JSON reads it back (sorted keys, compact), its own checksum left
    out: the weights file has one, and an edited manifest could pair its parts with the wrong tensors."""
    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(json.loads(json.dumps(content)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_sizes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of the artifact's own files: the weights file its manifest names, and the manifest."""
    manifest = read_manifest(path)
    return {"weights_file": _weights_path(path, manifest).stat().st_size,
            "manifest": (Path(path) / MANIFEST_FILE).stat().st_size}


def _upgrade_v1(m: dict) -> None:
    """A version-1 manifest in version-2 terms: safetensors container, fp32 per-channel scales."""
    m["container"] = "safetensors"
    m.setdefault("weights_file", CONTAINERS["safetensors"])
    for rec in m.get("layers", {}).values() if isinstance(m.get("layers"), dict) else ():
        scale = rec.get("parts", {}).get("scale") if isinstance(rec, dict) and isinstance(rec.get("parts"), dict) else None
        if isinstance(scale, dict):
            scale.update(format="fp32", channels=scale.get("raw_bytes", 0) // 4 if _is_int(scale.get("raw_bytes")) else 0)


# -- manifest structure -------------------------------------------------------------------

class _Bad(Exception):
    """A field of the manifest has the wrong type or value: (field path, what is wrong)."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _need(cond: bool, field: str, what: str) -> None:
    if not cond:
        raise _Bad(field, what)


def _int(x, field: str, lo: int | None = 0, hi: int | None = None) -> int:
    rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
    _need(_is_int(x) and (lo is None or x >= lo) and (hi is None or x <= hi), field, f"must be an integer{rng}, got {x!r:.80}")
    return x


def _dict(x, field: str) -> dict:
    _need(isinstance(x, dict), field, f"must be an object, got {type(x).__name__}")
    return x


def _list(x, field: str) -> list:
    _need(isinstance(x, list), field, f"must be a list, got {type(x).__name__}")
    return x


def _str(x, field: str) -> str:
    _need(isinstance(x, str), field, f"must be a string, got {type(x).__name__}")
    return x


def _shape(x, field: str, min_dims: int = 0) -> list[int]:
    _list(x, field)
    _need(min_dims <= len(x) <= 32, field, f"must have {min_dims}..32 dimensions, got {len(x)}")
    for i, d in enumerate(x):
        _int(d, f"{field}[{i}]", 0, 1 << 62)
    return x


def _number_or_none(x, field: str) -> None:
    _need(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)),
          field, f"must be a finite number or null, got {x!r:.80}")


def _dtype(x, field: str) -> torch.dtype:
    _str(x, field)
    dt = getattr(torch, x, None) if x.isidentifier() else None
    _need(isinstance(dt, torch.dtype), field, f"is not a torch dtype: {x!r:.80}")
    return dt


def _prod(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def _check_part(rec, field: str, expected_raw: int, codecs: tuple[str, ...]) -> None:
    _dict(rec, field)
    for key in ("key", "bytes", "codec", "raw_bytes"):
        _need(key in rec, f"{field}.{key}", "is missing")
    _str(rec["key"], f"{field}.key")
    _need(rec["codec"] in codecs, f"{field}.codec", f"must be one of {list(codecs)}, got {rec['codec']!r:.80}")
    _int(rec["bytes"], f"{field}.bytes")
    _int(rec["raw_bytes"], f"{field}.raw_bytes")
    _need(rec["raw_bytes"] == expected_raw, f"{field}.raw_bytes",
          f"is {rec['raw_bytes']}, but the layer record implies {expected_raw}")
    if rec["codec"] == "raw":
        _need(rec["bytes"] == rec["raw_bytes"], f"{field}.bytes", "must equal raw_bytes for codec 'raw'")


def _check_layer(rec, field: str) -> None:
    _dict(rec, field)
    for key in ("shape", "bits", "numel", "encoding", "entries", "parts"):
        _need(key in rec, f"{field}.{key}", "is missing")
    shape = _shape(rec["shape"], f"{field}.shape", min_dims=1)
    bits = _int(rec["bits"], f"{field}.bits", _packing.MIN_BITS, _packing.MAX_BITS)
    numel = _int(rec["numel"], f"{field}.numel")
    _need(numel == _prod(shape), f"{field}.numel", f"is {numel}, but shape {shape} has {_prod(shape)} elements")
    enc = rec["encoding"]
    _need(enc in _packing.ENCODINGS, f"{field}.encoding", f"must be one of {list(_packing.ENCODINGS)}, got {enc!r:.80}")
    entries = _int(rec["entries"], f"{field}.entries", 0, numel)
    if enc == "dense":
        _need(entries == numel, f"{field}.entries", f"must equal numel ({numel}) for the dense encoding")
    levels = rec.get("levels")
    _need(levels is None or levels == "nonzero" and enc == "bitmask" and bits <= 7, f"{field}.levels",
          f"must be absent or 'nonzero' (bitmask encoding, at most 7 bits), got {levels!r:.80}")
    index_bits = rec.get("index_bits")
    if enc == "relative":
        _int(index_bits, f"{field}.index_bits", min(_packing.INDEX_BITS), max(_packing.INDEX_BITS))
    else:
        _need(index_bits is None or _is_int(index_bits), f"{field}.index_bits", f"must be an integer or null, got {index_bits!r:.80}")
    act_bits = rec.get("act_bits")
    if act_bits is not None:
        _int(act_bits, f"{field}.act_bits", 1, 32)
    _number_or_none(rec.get("act_scale"), f"{field}.act_scale")
    _need(rec.get("act_scale") is None or rec["act_scale"] > 0, f"{field}.act_scale",
          f"must be positive (a step), got {rec.get('act_scale')!r:.80}")
    _need(isinstance(rec.get("act_signed", True), bool), f"{field}.act_signed",
          f"must be true or false, got {rec.get('act_signed')!r:.80}")
    for key in ("nonzero", "sparsity"):
        if key in rec:
            _need(isinstance(rec[key], (int, float)) and not isinstance(rec[key], bool), f"{field}.{key}",
                  f"must be a number, got {rec[key]!r:.80}")
    parts = _dict(rec["parts"], f"{field}.parts")
    needed = {"values", "scale"} | ({"indices"} if enc != "dense" else set())
    _need(set(parts) in (needed, needed | {"bias"}), f"{field}.parts",
          f"must have exactly the parts {sorted(needed)} (and optionally 'bias'), got {sorted(parts)}")
    _check_part(parts["values"], f"{field}.parts.values", _packing.packed_nbytes(entries, bits), _entropy.CODECS)
    if enc == "bitmask":
        _check_part(parts["indices"], f"{field}.parts.indices", _packing.packed_nbytes(numel, 1), _entropy.CODECS)
    elif enc == "relative":
        _check_part(parts["indices"], f"{field}.parts.indices", _packing.packed_nbytes(entries, index_bits), _entropy.CODECS)
    _check_scale(parts["scale"], f"{field}.parts.scale", shape[0])
    if "bias" in parts:
        _check_bias(parts["bias"], f"{field}.parts.bias", shape[0])


def _check_scale(rec, field: str, channels: int) -> None:
    _dict(rec, field)
    for key in ("format", "channels"):
        _need(key in rec, f"{field}.{key}", "is missing")
    _need(rec["format"] in _precision.STEP_FORMATS, f"{field}.format",
          f"must be one of {list(_precision.STEP_FORMATS)}, got {rec['format']!r:.80}")
    if "live_only" in rec:  # the steps of the channels with a kept weight or a bias only (encode.live_channels)
        _need(rec["live_only"] is True, f"{field}.live_only", f"must be true where present, got {rec['live_only']!r:.40}")
        _need(_is_int(rec["channels"]) and 1 <= rec["channels"] < max(channels, 2), f"{field}.channels",
              f"must be between 1 and the layer's {channels} output channels less one, got {rec['channels']!r:.80}")
    else:
        _need(rec["channels"] in (1, channels) and _is_int(rec["channels"]), f"{field}.channels",
              f"must be 1 or the layer's {channels} output channels, got {rec['channels']!r:.80}")
    _check_part(rec, field, _precision.scale_nbytes({"codec": rec["format"], "channels": rec["channels"]}), _entropy.CODECS)


def _check_bias(rec, field: str, channels: int) -> None:
    _dict(rec, field)
    _need(rec.get("format") in _precision.BIAS_FORMATS, f"{field}.format",
          f"must be one of {list(_precision.BIAS_FORMATS)}, got {rec.get('format')!r:.80}")
    if rec["format"] == "int":
        _int(rec.get("bits"), f"{field}.bits", 2, _precision.MAX_BIAS_BITS)
    _check_part(rec, field, _precision.bias_nbytes({"codec": rec["format"], "bits": rec.get("bits")}, channels),
                _entropy.CODECS)


def _check_weights_file(name) -> None:
    _str(name, "weights_file")
    _need(name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
          and Path(name).name == name and not Path(name).is_absolute() and not (len(name) > 1 and name[1] == ":"),
          "weights_file", f"must be a bare file name inside the artifact directory, got {name!r:.120}")


def _validate_fields(m: dict) -> None:
    """Every field's type and range, naming the field that is wrong (ArtifactError)."""
    if "weights_file" in m:
        _check_weights_file(m["weights_file"])
    sha = _str(m["weights_sha256"], "weights_sha256")
    _need(len(sha) == 64 and all(c in "0123456789abcdef" for c in sha), "weights_sha256", "must be 64 lowercase hex digits")
    _int(m["weights_file_bytes"], "weights_file_bytes")
    for key in ("recipe", "extra"):
        _need(m.get(key) is None or isinstance(m[key], dict), key, f"must be an object or null, got {type(m.get(key)).__name__}")
    if "bytes" in m:
        _dict(m["bytes"], "bytes")
    _need(isinstance(m.get("container"), str) and m["container"] in CONTAINERS, "container",  # a dict is unhashable
          f"must be one of {sorted(CONTAINERS)}, got {m.get('container')!r:.80}")
    if m["container"] == "jcw":
        keys = _list(m.get("blob_keys"), "blob_keys")
        _need(all(isinstance(k, str) for k in keys) and len(set(keys)) == len(keys), "blob_keys",
              "must be a list of distinct part names")
    _validate_structure(m)
    _validate_inputs(m)
    _validate_tensors(m)


def _validate_structure(m: dict) -> None:
    """How the model is rebuilt: the pruning history, the dropped blocks, the raised strides."""
    for i, step in enumerate(_list(m["pruning_history"], "pruning_history")):
        f = f"pruning_history[{i}]"
        _need(isinstance(step, list) and len(step) == 3, f, "must be a [module name, is_out_channels, [indices]] triple")
        _str(step[0], f"{f}[0]")
        _need(isinstance(step[1], bool), f"{f}[1]", f"must be true or false, got {step[1]!r:.80}")
        for j, idx in enumerate(_list(step[2], f"{f}[2]")):
            _int(idx, f"{f}[2][{j}]", 0, 1 << 62)
    for i, name in enumerate(_list(m.get("dropped_blocks", []), "dropped_blocks")):
        _str(name, f"dropped_blocks[{i}]")
    for i, step in enumerate(_list(m.get("later_dropped_blocks", []), "later_dropped_blocks")):
        f = f"later_dropped_blocks[{i}]"
        _need(isinstance(step, list) and len(step) == 2, f, "must be a [history position, [block names]] pair")
        _int(step[0], f"{f}[0]", 0, len(m["pruning_history"]))
        for j, name in enumerate(_list(step[1], f"{f}[1]")):
            _str(name, f"{f}[1][{j}]")
    for name, stride in _dict(m.get("strides", {}), "strides").items():
        _need(isinstance(stride, list) and 1 <= len(stride) <= 3, f"strides[{name!r}]", "must be a list of 1 to 3 integers")
        for j, s in enumerate(stride):
            _int(s, f"strides[{name!r}][{j}]", 1, 64)
    for i, name in enumerate(_list(m.get("folded_norms", []), "folded_norms")):
        _str(name, f"folded_norms[{i}]")


def _validate_inputs(m: dict) -> None:
    """The example inputs the history is replayed with."""
    for i, rec in enumerate(_list(m["example_inputs"], "example_inputs")):
        f = f"example_inputs[{i}]"
        _dict(rec, f)
        for key in ("shape", "dtype"):
            _need(key in rec, f"{f}.{key}", "is missing")
        if "name" in rec:  # an input given by name (a model called with keyword inputs)
            _str(rec["name"], f"{f}.name")
        shape = _shape(rec["shape"], f"{f}.shape")
        _need(_prod(shape) <= MAX_INPUT_NUMEL, f"{f}.shape", f"{shape} has more than {MAX_INPUT_NUMEL} elements")
        _dtype(rec["dtype"], f"{f}.dtype")


def _validate_tensors(m: dict) -> None:
    """The stored tensors: quantized layers, other tensors and the names that alias them."""
    layers = _dict(m["layers"], "layers")
    for name, rec in layers.items():
        _check_layer(rec, f"layers[{name!r}]")
    others = _dict(m["other_tensors"], "other_tensors")
    for key, rec in others.items():
        f = f"other_tensors[{key!r}]"
        _dict(rec, f)
        _need("shape" in rec, f"{f}.shape", "is missing")
        _shape(rec["shape"], f"{f}.shape")
        if "dtype" in rec:
            _dtype(rec["dtype"], f"{f}.dtype")
        if "bytes" in rec:
            _int(rec["bytes"], f"{f}.bytes")
        if "fill" in rec:  # one stored entry for a tensor whose entries are all equal
            _need(rec["fill"] is True, f"{f}.fill", f"must be true where present, got {rec['fill']!r:.40}")
        if "loaded_as" in rec:  # the writer narrows fp32 to fp16 and integers to narrower integers (encode.py)
            _need(_narrowed(rec.get("dtype"), rec["loaded_as"]), f"{f}.loaded_as",
                  f"is {rec['loaded_as']!r:.40} for a {rec.get('dtype')!r:.40} tensor; only float16 stored for float32 "
                  "loads, or a signed integer stored narrower than the integer it loads as")
        _need(key.removesuffix(".weight") not in layers or not key.endswith(".weight"), f,
              "is also stored as a quantized layer")
    stored = {f"{n}.{p}" for n, rec in layers.items() for p in ("weight", "bias") if p == "weight" or "bias" in rec["parts"]}
    for key, source in _dict(m.get("aliases", {}), "aliases").items():
        _str(source, f"aliases[{key!r}]")
        _need(source in stored or source in others, f"aliases[{key!r}]", f"names {source!r:.80}, which is not stored")
        _need(key not in stored and key not in others, f"aliases[{key!r}]", "names a tensor that is stored itself")


def _narrowed(stored, loaded) -> bool:
    """Whether a manifest's (dtype, loaded_as) pair is one the writer makes (exact both ways)."""
    ints = ("int8", "int16", "int32", "int64")
    if (stored, loaded) == ("float16", "float32"):
        return True
    return stored in ints and loaded in ints and ints.index(stored) < ints.index(loaded)


def _validate(manifest: dict, mpath: Path, saving: bool = False) -> None:
    try:
        _validate_fields(manifest)
    except _Bad as bad:
        field, what = bad.args
        why = ("not written: load would refuse it (a bug of the writer; nothing was changed on disk)" if saving
               else "the manifest is corrupted or was edited")
        raise ArtifactError(f"{mpath}: field {field} {what}; {why}") from None


def _weights_path(path: str | os.PathLike, manifest: dict) -> Path:
    name = manifest.get("weights_file", WEIGHTS_FILE)
    try:
        _check_weights_file(name)
    except _Bad as bad:
        raise ArtifactError(f"{Path(path) / MANIFEST_FILE}: field {bad.args[0]} {bad.args[1]}") from None
    return Path(path) / name


def check_weights_file(path: str | os.PathLike, manifest: dict) -> None:
    """ArtifactError where the weights file of the artifact in `path` is missing, or its size or sha256 is not
    the manifest's (truncated, replaced, flipped): what load checks, for readers of the manifest alone."""
    _read_blob(path, manifest)


def _read_blob(path: str | os.PathLike, manifest: dict) -> tuple[bytes, Path]:
    wpath = _weights_path(path, manifest)
    try:
        blob = wpath.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactError(f"{wpath}: not found (the manifest expects it)") from exc
    except OSError as exc:  # a directory, no permission, ...
        raise ArtifactError(f"{wpath}: cannot be read ({exc})") from exc
    if len(blob) != manifest["weights_file_bytes"]:
        raise ArtifactError(f"{wpath}: has {len(blob)} bytes, the manifest says {manifest['weights_file_bytes']}; "
                            + _mismatch_cause(Path(path), "the file is truncated or was replaced"))
    if hashlib.sha256(blob).hexdigest() != manifest["weights_sha256"]:
        raise ArtifactError(f"{wpath}: sha256 does not match the manifest; "
                            + _mismatch_cause(Path(path), "the file was modified or corrupted"))
    return blob, wpath


def _mismatch_cause(path: Path, otherwise: str) -> str:
    """Why the weights file and the manifest disagree: a save killed between its two files leaves its
    temporary files behind, and the artifact it was replacing under `.previous.` names."""
    kept = _previous_files(path)
    if kept:
        moves = "; ".join(f"rm {p.name}" if _same_file(p, path / p.name.removeprefix(PREVIOUS))
                          else f"mv {p.name} {p.name.removeprefix(PREVIOUS)}" for p in kept)
        return (f"a save into {path} was interrupted; the artifact it was replacing is kept there as "
                f"{', '.join(p.name for p in kept)}: restore it ({moves}) or save the model again")
    left = _save_leftovers(path)
    if left:
        return f"a save into {path} was interrupted (it left {', '.join(p.name for p in left[:2])}): save the model again"
    return f"{otherwise}, or a save into this folder was interrupted"


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one file (a backup hard-linked to a file the interrupted save had not replaced yet)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _layer_part_keys(manifest: dict) -> dict[str, dict]:
    return {p["key"]: p for rec in manifest["layers"].values() for p in rec["parts"].values()}


def read_weights(path: str | os.PathLike, manifest: dict) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    """(stored bytes of every layer part, other tensors), after checking size and sha256."""
    blob, wpath = _read_blob(path, manifest)
    if manifest["container"] == "jcw":
        try:
            chunks = _container.unpack(blob)
        except ValueError as exc:
            raise ArtifactError(f"{wpath}: {exc}") from exc
        if len(chunks) != len(manifest["blob_keys"]):
            raise ArtifactError(f"{wpath}: holds {len(chunks)} parts, the manifest lists {len(manifest['blob_keys'])}")
        parts = dict(zip(manifest["blob_keys"], chunks))
        return parts, {k: _other_tensor(k, rec, parts, str(wpath)) for k, rec in manifest["other_tensors"].items()}
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(blob)
    except Exception as exc:
        raise ArtifactError(f"{wpath}: not a readable safetensors file ({exc})") from exc
    parts = {}
    for key, rec in _layer_part_keys(manifest).items():
        t = tensors.pop(key, None)
        if t is None:
            continue  # reported as missing by encode.part_bytes
        want = torch.float32 if rec.get("format") == "fp32" and manifest["format_version"] == 1 else torch.uint8
        if t.dtype != want or t.dim() != 1:
            raise ArtifactError(f"{wpath}: tensor {key!r} should be 1-D {want}, it is {t.dtype} {list(t.shape)}")
        parts[key] = t.numpy().tobytes()
    unlisted = sorted(set(tensors) - set(manifest["other_tensors"]))
    if unlisted:  # loaded without a word before: the file is not the one the manifest describes
        more = f" and {len(unlisted) - 1} more" if len(unlisted) > 1 else ""
        raise ArtifactError(f"{wpath}: holds tensor {unlisted[0]!r}{more} that the manifest does not list; the weights "
                            "file is not the one saved with this manifest")
    return parts, tensors


def _other_tensor(key: str, rec: dict, parts: dict[str, bytes], where: str) -> torch.Tensor:
    if key not in parts:
        raise ArtifactError(f"{where}: tensor {key!r} listed in the manifest is missing")
    if "dtype" not in rec:
        raise ArtifactError(f"{where}: tensor {key!r} has no dtype in the manifest")
    dtype = getattr(torch, rec["dtype"])
    data = parts[key]
    size = torch.empty((), dtype=dtype).element_size()
    numel = 1 if rec.get("fill") else _prod(rec["shape"])
    if len(data) != numel * size:
        what = "one entry, filled in" if rec.get("fill") else rec["shape"]
        raise ArtifactError(f"{where}: tensor {key!r} has {len(data)} bytes, {rec['dtype']} {what} needs {numel * size}")
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    return flat.view(dtype).reshape([1] if rec.get("fill") else rec["shape"]).clone()


def _state(manifest: dict, parts: dict[str, bytes], tensors: dict[str, torch.Tensor], where: str,
           spec: CompressionSpec) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, rec in manifest["layers"].items():
        weight, scale, bias = _enc.decode_layer(name, rec, parts, where)
        state[f"{name}.weight"] = weight
        if bias is not None:
            state[f"{name}.bias"] = bias
        spec.layers[name] = LayerSpec(rec["bits"], scale, rec.get("act_bits"), rec.get("act_scale"),
                                      rec.get("act_signed", True), rec.get("levels") == "nonzero")
    for key, rec in manifest["other_tensors"].items():
        if key not in tensors:
            raise ArtifactError(f"{where}: tensor {key!r} listed in the manifest is missing")
        t = tensors[key]
        if rec.get("fill") and t.numel() == 1:  # one value for every entry (encode.constant)
            t = t.reshape([]).expand(rec["shape"]).clone()
        if list(t.shape) != rec["shape"] or ("dtype" in rec and t.dtype != getattr(torch, rec["dtype"])):
            raise ArtifactError(
                f"{where}: tensor {key!r} is {list(t.shape)} {str(t.dtype).replace('torch.', '')}, the manifest "
                f"says {rec['shape']} {rec.get('dtype', '')}".rstrip()
            )
        state[key] = t.to(getattr(torch, rec["loaded_as"])) if "loaded_as" in rec else t  # stored narrower, exactly
    for key, source in manifest.get("aliases", {}).items():  # one tensor held under two names: stored once
        state[key] = state[source]
    return state


def load_with_spec(path: str | os.PathLike, builder: Callable[[], nn.Module] | None = None
                   ) -> tuple[nn.Module, CompressionSpec]:
    """The finalized model (eval mode) and the CompressionSpec it was saved with."""
    if isinstance(builder, nn.Module):
        raise ArtifactError(f"load({str(path)!r}, builder): builder is a model ({type(builder).__name__}); pass the "
                            "function that builds it (load(path, build), not load(path, build())): the pruning is "
                            "replayed on a fresh model")
    manifest = read_manifest(path)
    if not callable(builder):  # None, or a model's name: torch's "'str' object is not callable" said nothing of it
        raise ArtifactError(_builder_needed(path, manifest, builder))
    parts, tensors = read_weights(path, manifest)
    where = str(_weights_path(path, manifest))
    history = manifest["pruning_history"]
    dropped = manifest.get("dropped_blocks", [])  # absent from artifacts written before prune_blocks
    later = manifest.get("later_dropped_blocks", [])  # present only where a later run dropped blocks
    strides = manifest.get("strides", {})  # present only where raise_stride downsampled a layer
    model = rebuild(builder, history, manifest["example_inputs"], str(path), dropped, later, strides)
    check_shapes(model, manifest["layers"], manifest["other_tensors"], where, manifest.get("aliases"))
    _check_folded_norms(model, manifest.get("folded_norms", []), str(path))
    try:
        spec = CompressionSpec(pruning_history=history, recipe=manifest.get("recipe"), dropped_blocks=list(dropped),
                               later_dropped_blocks=[(int(n), list(names)) for n, names in later],
                               strides={k: list(v) for k, v in strides.items()},
                               folded_norms=list(manifest.get("folded_norms", [])))
        load_model_state(model, _state(manifest, parts, tensors, where, spec), strict=True)
    except ArtifactError:
        raise
    except Exception as exc:  # malformed content the checks above did not anticipate: still the artifact's fault
        raise ArtifactError(
            f"{where}: the artifact's content is inconsistent and cannot be loaded ({type(exc).__name__}: {exc})"
        ) from exc
    _attach_input_quant(model, spec)
    if history or dropped or strides:  # a further run on this model saves an artifact that rebuilds from the same builder
        setattr(model, PRIOR_STRUCTURE, spec.structure())
    return model.eval(), spec


def _check_folded_norms(model: nn.Module, names: list[str], where: str) -> None:
    """folded_norms names the BatchNorm layers whose statistics the file does not store (finalize folded them); a
    name of another module (a convolution) was accepted, and its running statistics filled as a norm's."""
    modules = dict(model.named_modules())
    for i, name in enumerate(names):
        if not isinstance(modules.get(name), nn.modules.batchnorm._BatchNorm):
            got = type(modules[name]).__name__ if name in modules else "no module of the builder's model"
            raise ArtifactError(f"{where}/manifest.json: folded_norms[{i}] names {name!r}, which is {got}, not a "
                                "BatchNorm layer; the manifest was edited, or the builder is another architecture")


def _attach_input_quant(model: nn.Module, spec: CompressionSpec) -> None:
    """Layers trained on rounded inputs (quant_lsq activations: true) round them again, as finalize left them."""
    from ..techniques.quant_lsq import attach_frozen_input_quant

    for name, ls in spec.layers.items():
        if ls.act_bits is not None and ls.act_scale is not None:
            attach_frozen_input_quant(model.get_submodule(name), int(ls.act_bits), float(ls.act_scale), ls.act_signed)


def load(path: str | os.PathLike, builder: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild the shrunken model from a fresh `builder()` and load the unpacked weights."""
    return load_with_spec(path, builder)[0]


def _builder_needed(path, manifest: dict, given) -> str:
    """What load needs where it got no function: the function that builds the architecture, with what the manifest
    records of it (the model's name, the example inputs' shapes) for a receiver who never saw the run."""
    model = (manifest.get("recipe") or {}).get("model")
    shapes = ", ".join(str([1, *rec.get("shape", [])[1:]]) for rec in manifest.get("example_inputs") or [])
    recorded = (f" The manifest records model {model!r}" if model else " The manifest records no model name") + (
        f" and example inputs of shape {shapes}" if shapes else "")
    builtin = (f"; a built-in model is built by jointcompress.models.build_model({model!r}, image_size=..., "
               "num_classes=..., in_channels=...) at those inputs' size, as `jointcompress bench ARTIFACT` builds it"
               if model and ":" not in str(model) else "")
    return (f"load({str(path)!r}, builder): builder is {type(given).__name__ if given is not None else 'missing'}; "
            "pass the function that builds the model's architecture, fresh (load(path, build), e.g. lambda: MyNet()): "
            f"the pruning history is replayed on it.{recorded}{builtin}")

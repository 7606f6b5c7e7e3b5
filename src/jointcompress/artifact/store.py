"""Save and load a deployable artifact: a directory with weights.safetensors + manifest.json.

Why this layout: safetensors and JSON cannot execute code when read (no pickle anywhere), the
manifest is human-readable, and everything needed to check the weights file (exact byte count
of every part, sha256, format version) is stated before a single tensor is trusted. Both
files are written atomically (temp file + os.replace), weights first and manifest last, so a
crash mid-save leaves either the old artifact or a manifest whose sha256 no longer matches
(and `load` says so) -- never a silently half-written model.

The shrunken architecture is not pickled either: the manifest stores Torch-Pruning's pruning
history, and `load` replays it on the dense model the caller's `builder` returns.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import ArtifactError
from ..spec import CompressionSpec, LayerSpec
from . import encode as _enc

FORMAT = "jointcompress-artifact"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("jointcompress")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _input_records(example_inputs) -> list[dict]:
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in _as_tuple(example_inputs)]


def _dummy_inputs(records: list[dict]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(r["shape"], dtype=getattr(torch, r["dtype"])) for r in records)


def _history_json(history) -> list[list]:
    return [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in history]


def rebuild(builder: Callable[[], nn.Module], history: list, inputs: tuple, where: str) -> nn.Module:
    """A fresh model from `builder`, with the recorded structured pruning replayed on it."""
    model = builder()
    if not history:
        return model
    from ..graph import build_graph

    try:
        dg = build_graph(model, inputs if len(inputs) != 1 else inputs[0])
        dg.load_pruning_history(_history_json(history))
    except Exception as exc:
        raise ArtifactError(
            f"{where}: replaying the pruning history on the builder's model failed ({type(exc).__name__}: {exc}); "
            "is the builder the same architecture the artifact was trained from?"
        ) from exc
    return model


def check_shapes(model: nn.Module, layers: dict, others: dict, where: str) -> None:
    """Every stored tensor must exist in the rebuilt model with the same shape, and vice versa."""
    expected = {f"{n}.weight": tuple(r["shape"]) for n, r in layers.items()}
    expected.update({k: tuple(r["shape"]) for k, r in others.items()})
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
            "pass the builder of the architecture the artifact was made from (e.g. the right --model)"
        )


def save(
    model: nn.Module,
    spec: CompressionSpec,
    path: str | os.PathLike,
    builder: Callable[[], nn.Module] | None = None,
    example_inputs=None,
    extra: dict[str, Any] | None = None,
    entropy: bool = True,
) -> dict:
    """Write the artifact directory `path` and return its manifest.

    `example_inputs` fixes the input shape used to replay the pruning history at load time
    (required when the spec has a pruning history). With a `builder`, the replay is checked
    now against `model`, so an artifact that could not be loaded is never written.
    `entropy` zstd-compresses each packed part where that makes it smaller.
    """
    path = Path(path)
    history = _history_json(spec.pruning_history or [])
    if history and example_inputs is None:
        raise ArtifactError(f"{path}: save() needs example_inputs to record how to replay the pruning history")
    inputs = _input_records(example_inputs)
    encoding = _enc.encode_model(model, spec, entropy=entropy)
    if builder is not None:
        rebuilt = rebuild(builder, history, _dummy_inputs(inputs), str(path))
        check_shapes(rebuilt, encoding.layers, encoding.others, f"{path} (checked at save time)")

    from safetensors.torch import save as st_save

    blob = st_save(encoding.tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    (header_len,) = struct.unpack("<Q", blob[:8])
    totals = encoding.totals()
    if len(blob) != 8 + header_len + totals["total"]:  # safetensors added bytes we do not account for
        raise ArtifactError(f"{path}: safetensors wrote {len(blob)} bytes, expected {8 + header_len + totals['total']}")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "torch_version": torch.__version__,
        "recipe": spec.recipe,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "weights_file_bytes": len(blob),
        "bytes": {**totals, "safetensors_header": 8 + header_len},
        "example_inputs": inputs,
        "pruning_history": history,
        "layers": encoding.layers,
        "other_tensors": encoding.others,
        "extra": extra or {},
    }
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / WEIGHTS_FILE, blob)
    _atomic_write(path / MANIFEST_FILE, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def read_manifest(path: str | os.PathLike) -> dict:
    """Parse and version-check manifest.json; raises ArtifactError naming the file."""
    mpath = Path(path) / MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{mpath}: not found; is {path} an artifact directory written by save()?") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath}: not valid JSON ({exc}); the file is truncated or corrupted") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: format_version {manifest.get('format_version')!r} is not supported by this "
            f"jointcompress ({package_version()}, reads version {FORMAT_VERSION}); use the version that wrote it "
            f"({manifest.get('package_version')!r})"
        )
    for key in ("weights_sha256", "weights_file_bytes", "layers", "other_tensors", "pruning_history", "example_inputs"):
        if key not in manifest:
            raise ArtifactError(f"{mpath}: field {key!r} is missing")
    return manifest


def read_weights(path: str | os.PathLike, manifest: dict) -> dict[str, torch.Tensor]:
    """Read weights.safetensors after checking its size and sha256 against the manifest."""
    wpath = Path(path) / manifest.get("weights_file", WEIGHTS_FILE)
    try:
        blob = wpath.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactError(f"{wpath}: not found (the manifest expects it)") from exc
    if len(blob) != manifest["weights_file_bytes"]:
        raise ArtifactError(
            f"{wpath}: has {len(blob)} bytes, the manifest says {manifest['weights_file_bytes']}; the file is truncated or was replaced"
        )
    if hashlib.sha256(blob).hexdigest() != manifest["weights_sha256"]:
        raise ArtifactError(f"{wpath}: sha256 does not match the manifest; the file was modified or corrupted")
    from safetensors.torch import load as st_load

    try:
        return st_load(blob)
    except Exception as exc:
        raise ArtifactError(f"{wpath}: not a readable safetensors file ({exc})") from exc


def load_with_spec(path: str | os.PathLike, builder: Callable[[], nn.Module]) -> tuple[nn.Module, CompressionSpec]:
    """The finalized model (eval mode) and the CompressionSpec it was saved with."""
    manifest = read_manifest(path)
    tensors = read_weights(path, manifest)
    where = str(Path(path) / manifest.get("weights_file", WEIGHTS_FILE))
    model = rebuild(builder, manifest["pruning_history"], _dummy_inputs(manifest["example_inputs"]), str(path))
    check_shapes(model, manifest["layers"], manifest["other_tensors"], where)
    state: dict[str, torch.Tensor] = {}
    spec = CompressionSpec(pruning_history=manifest["pruning_history"], recipe=manifest.get("recipe"))
    for name, rec in manifest["layers"].items():
        weight, scale = _enc.decode_layer(name, rec, tensors, where)
        state[f"{name}.weight"] = weight
        spec.layers[name] = LayerSpec(rec["bits"], scale, rec.get("act_bits"), rec.get("act_scale"))
    for key in manifest["other_tensors"]:
        if key not in tensors:
            raise ArtifactError(f"{where}: tensor {key!r} listed in the manifest is missing")
        state[key] = tensors[key]
    model.load_state_dict(state, strict=True)
    return model.eval(), spec


def load(path: str | os.PathLike, builder: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild the shrunken model from a fresh `builder()` and load the unpacked weights."""
    return load_with_spec(path, builder)[0]

"""save/load of deployable artifacts: exact sizes, exact logits, shrunken shapes, clear failures."""
import copy
import json
import os
import struct
import warnings

import pytest
import torch
import torch.nn as nn

from artifact_helpers import MLP, SmallCNN, TinyResNet, example_input, fake_finalize
from jointcompress.artifact import dense_fp32_bytes, load, load_with_spec, read_manifest, save, storage_bytes
from jointcompress.artifact.store import manifest_digest
from jointcompress.errors import ArtifactError


@pytest.fixture(scope="module")
def cnn_artifact(tmp_path_factory):
    x = example_input()
    model, spec = fake_finalize(SmallCNN(), x, bits=4)
    path = tmp_path_factory.mktemp("cnn")
    manifest = save(model, spec, path, builder=SmallCNN, example_inputs=x, extra={"note": "test"})
    return model, spec, path, manifest, x


@pytest.mark.parametrize("cls", [MLP, SmallCNN, TinyResNet])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_roundtrip_same_logits(tmp_path, cls, bits):
    x = example_input(4)
    model, spec = fake_finalize(cls(), x, bits=bits)
    save(model, spec, tmp_path, builder=cls, example_inputs=x)
    loaded = load(tmp_path, cls)
    with torch.no_grad():
        assert (model(x) - loaded(x)).abs().max().item() <= 1e-5
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_bytes_on_disk_equal_manifest_and_size_accounting(cnn_artifact):
    model, spec, path, manifest, _ = cnn_artifact
    weights = path / "weights.jcw"
    size = os.path.getsize(weights)
    b = manifest["bytes"]
    assert size == manifest["weights_file_bytes"] == b["file"] == b["total"] + b["container"]
    acc = storage_bytes(model, spec)
    for part in ("values", "indices", "scales", "biases", "other", "total"):
        assert acc[part] == b[part], part
    # the container's index really delimits parts of exactly the listed sizes, in blob_keys order
    from jointcompress.artifact import container

    chunks = container.unpack(weights.read_bytes())
    sizes = {k: len(c) for k, c in zip(manifest["blob_keys"], chunks)}
    for name, rec in manifest["layers"].items():
        for part in rec["parts"].values():
            assert sizes[part["key"]] == part["bytes"]
    assert b["container"] == container.overhead(list(sizes.values())) <= 60
    assert acc["total"] < dense_fp32_bytes(SmallCNN()) / 10


def test_safetensors_container_holds_the_same_parts(cnn_artifact, tmp_path):
    model, spec, path, manifest, x = cnn_artifact
    st = save(model, spec, tmp_path, builder=SmallCNN, example_inputs=x, container="safetensors")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "weights.safetensors")
    (header_len,) = struct.unpack("<Q", (tmp_path / "weights.safetensors").read_bytes()[:8])
    assert st["bytes"]["container"] == 8 + header_len and st["bytes"]["total"] == manifest["bytes"]["total"]
    for name, rec in st["layers"].items():
        for part in rec["parts"].values():
            t = tensors[part["key"]]
            assert t.dtype == torch.uint8 and t.numel() == part["bytes"]
    assert torch.equal(tensors["bn1.running_var"], model.bn1.running_var)  # other tensors stay readable as is
    loaded = load(tmp_path, SmallCNN)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a tensor the manifest does not list (the file's digest and size signed again) loaded without a word
    import hashlib

    from safetensors.torch import save_file

    from jointcompress.artifact.store import manifest_digest

    save_file({**tensors, "evil": torch.zeros(3)}, str(tmp_path / "weights.safetensors"))
    data = (tmp_path / "weights.safetensors").read_bytes()
    m = json.loads((tmp_path / "manifest.json").read_text())
    m.update(weights_sha256=hashlib.sha256(data).hexdigest(), weights_file_bytes=len(data))
    m["manifest_sha256"] = manifest_digest(m)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"holds tensor 'evil' that the manifest does not list"):
        load(tmp_path, SmallCNN)


def test_manifest_content(cnn_artifact):
    _, spec, path, manifest, _ = cnn_artifact
    text = (path / "manifest.json").read_text()
    on_disk = json.loads(text)
    assert on_disk == manifest == read_manifest(path)
    # compact JSON: indented, a small model's manifest outweighed its weights file
    assert text == json.dumps(manifest, sort_keys=True, separators=(",", ":")) + "\n"
    assert manifest["format_version"] == 2 and manifest["recipe"] == spec.recipe
    assert manifest["pruning_history"] == spec.pruning_history
    assert manifest["extra"] == {"note": "test"}
    conv2 = manifest["layers"]["conv2"]
    assert conv2["bits"] == 4 and conv2["shape"] == [8, 4, 5, 5]
    assert conv2["encoding"] in ("dense", "bitmask", "relative") and 0.3 < conv2["sparsity"] < 0.7
    assert not list(path.glob("*.tmp")) and not list(path.glob(".*tmp"))


@pytest.mark.parametrize("cls", [SmallCNN, TinyResNet])
def test_structured_pruning_really_shrinks_and_load_rebuilds(tmp_path, cls):
    x = example_input()
    dense = cls()
    n_dense = sum(p.numel() for p in dense.parameters())
    model, spec = fake_finalize(cls(), x, prune=0.5)
    assert sum(p.numel() for p in model.parameters()) < 0.6 * n_dense
    save(model, spec, tmp_path, builder=cls, example_inputs=x)
    loaded, loaded_spec = load_with_spec(tmp_path, cls)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert loaded(x).shape == (2, 10)
    for name, ls in spec.layers.items():
        assert torch.equal(loaded_spec.layers[name].scale, ls.scale) and loaded_spec.layers[name].bits == ls.bits


def test_residual_block_pruned_consistently():
    x = example_input()
    model, _ = fake_finalize(TinyResNet(), x, prune=0.5)
    c = model.stem.out_channels
    assert c == 4  # the skip connection couples stem, bn, block.conv2, block.bn2 and fc's input
    assert model.bn.num_features == model.block.conv2.out_channels == model.block.bn2.num_features == c
    assert model.block.conv1.in_channels == c and model.fc.in_features == c
    assert model.block.conv1.out_channels == model.block.bn1.num_features == model.block.conv2.in_channels == 4
    assert model(x).shape == (2, 10)


def test_truncated_weights_fail_naming_file(cnn_artifact, tmp_path):
    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x)
    w = tmp_path / "weights.jcw"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"weights\.jcw.*truncated"):
        load(tmp_path, SmallCNN)


def test_tampered_weights_fail_naming_file(cnn_artifact, tmp_path):
    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x)
    w = tmp_path / "weights.jcw"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights\.jcw.*sha256"):
        load(tmp_path, SmallCNN)


def test_a_save_killed_halfway_is_named_by_load_and_cleaned_by_the_next_save(cnn_artifact, tmp_path):
    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x)
    other, other_spec = fake_finalize(SmallCNN(), x, bits=2, seed=1)  # the save that was killed: weights in, manifest not
    from jointcompress.artifact import file_blob
    from jointcompress.artifact.encode import encode_model

    (tmp_path / "weights.jcw").write_bytes(file_blob(encode_model(other, other_spec)))
    (tmp_path / ".manifest.json.k1.tmp").write_text("{")
    with pytest.raises(ArtifactError, match=r"a save into .* was interrupted \(it left \.manifest\.json\.k1"):
        load(tmp_path, SmallCNN)
    save(model, spec, tmp_path, example_inputs=x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "weights.jcw"]
    with torch.no_grad():
        assert torch.equal(load(tmp_path, SmallCNN)(x), model(x))


def _killed_before_its_manifest(monkeypatch):
    """Make the next save stop as a kill would: its weights written, its manifest not."""
    from jointcompress.artifact import store

    real = store.atomic_write_bytes

    def write(path, data):
        if path.name == "manifest.json":
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(store, "atomic_write_bytes", write)
    return lambda: monkeypatch.setattr(store, "atomic_write_bytes", real)


def test_an_overwrite_killed_halfway_keeps_the_artifact_it_was_replacing(cnn_artifact, tmp_path, monkeypatch):
    """The overwrite lost the earlier artifact: its manifest no longer matched the new weights file."""
    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "weights.jcw"]  # no backups left over
    other, other_spec = fake_finalize(SmallCNN(), x, bits=2, seed=1)
    restore = _killed_before_its_manifest(monkeypatch)
    for _ in range(2):  # a second killed save must not take the half-replaced pair for the one to keep
        with pytest.raises(KeyboardInterrupt):
            save(other, other_spec, tmp_path, example_inputs=x)
    restore()
    with pytest.raises(ArtifactError, match=r"interrupted; the artifact it was replacing is kept there as "
                                            r"\.previous\.weights\.jcw, \.previous\.manifest\.json") as refused:
        load(tmp_path, SmallCNN)
    # the way back it prints, followed as written: `mv` of the manifest, one file with its backup, failed in a shell
    said = str(refused.value).split("restore it (")[1].split(")")[0]
    assert said == "mv .previous.weights.jcw weights.jcw; rm .previous.manifest.json"
    for command in said.split("; "):
        verb, *names = command.split()
        (tmp_path / names[0]).replace(tmp_path / names[1]) if verb == "mv" else (tmp_path / names[0]).unlink()
    with torch.no_grad():
        assert torch.equal(load(tmp_path, SmallCNN)(x), model(x))


def test_a_save_after_a_killed_overwrite_replaces_the_kept_artifact(cnn_artifact, tmp_path, monkeypatch):
    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x)
    other, other_spec = fake_finalize(SmallCNN(), x, bits=2, seed=1)
    restore = _killed_before_its_manifest(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save(other, other_spec, tmp_path, example_inputs=x)
    restore()
    save(other, other_spec, tmp_path, example_inputs=x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "weights.jcw"]
    with torch.no_grad():
        assert torch.equal(load(tmp_path, SmallCNN)(x), other(x))


def test_a_model_with_nan_parameters_is_not_saved_over_an_artifact(cnn_artifact, tmp_path):
    """A non-finite training step once finalized and saved a NaN model without a word."""
    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.fc2.bias[0] = float("nan")
    with pytest.raises(ArtifactError, match=r"not saved: 1 parameter\(s\) hold NaN or inf \(fc2\.bias\)"):
        save(broken, spec, tmp_path, example_inputs=x)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_file_over_the_recipes_size_target_is_warned_by_save(cnn_artifact, tmp_path):
    """A joint run's values fine-tuned after the budget's freeze coded to 712 B for a 709.9 B target, and
    nothing said so (the budget's own check ran at the freeze, on its estimate)."""
    model, spec, _, _, x = cnn_artifact
    size = save(model, spec, tmp_path / "a", example_inputs=x)["weights_file_bytes"]
    for target, expected in ((size - 1, 1), (size, 0)):
        recorded = copy.copy(spec)
        recorded.recipe = {"techniques": [{"type": "size_budget", "target_bytes": float(target)}]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            save(model, recorded, tmp_path / "b", example_inputs=x)
        said = [str(w.message) for w in caught if "over the size target" in str(w.message)]
        assert len(said) == expected and (not said or f"the weights file is {size:,} B, 1 B" in said[0])


def test_a_file_over_a_sequential_runs_target_is_warned_by_save_too(tmp_path):
    """A sequential run (the allocator's target, no size_budget) 0.8% over its ratio was warned by compress() and
    saved without a word; save reads the target's own bytes now: size_kb, or a ratio of the model's fp32 file."""
    from jointcompress.artifact import dense_fp32_bytes

    x = example_input()
    model, spec = fake_finalize(SmallCNN(), x, bits=4, prune=0)  # unstructured: the fp32 file is the trained model's
    size = save(model, spec, tmp_path / "a", example_inputs=x)["weights_file_bytes"]
    dense = dense_fp32_bytes(model)
    for target, expected in (({"size_kb": (size - 1) / 1024}, 1), ({"size_kb": size / 1024}, 0),
                             ({"ratio": dense / (size - 2)}, 1), ({"ratio": dense / (size + 0.5)}, 0)):
        recorded = copy.copy(spec)
        recorded.recipe = {"mode": "sequential", "target": {**target, "allocated": True}, "techniques": []}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            save(model, recorded, tmp_path / "b", example_inputs=x)
        said = [str(w.message) for w in caught if "over the size target" in str(w.message)]
        assert len(said) == expected, (target, said)


def test_paths_that_are_not_an_artifact_folder_fail_naming_the_fix(cnn_artifact, tmp_path):
    _, _, path, _, _ = cnn_artifact
    with pytest.raises(ArtifactError, match="is a file; pass the artifact directory"):
        load(path / "weights.jcw", SmallCNN)
    (tmp_path / "dir" / "manifest.json").mkdir(parents=True)
    with pytest.raises(ArtifactError, match=r"manifest\.json: cannot be read"):
        load(tmp_path / "dir", SmallCNN)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "manifest.json").write_text('{"format_version": ' + "9" * 5000 + "}")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load(tmp_path / "big", SmallCNN)


def test_an_edited_manifest_is_refused_by_its_own_checksum(cnn_artifact, tmp_path):
    """Swapping two same-sized part names loaded silently as a wrong model (NaN logits for BatchNorm's statistics)."""
    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x)
    m = json.loads((tmp_path / "manifest.json").read_text())
    keys = m["blob_keys"]
    keys[0], keys[1] = keys[1], keys[0]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"manifest\.json: its content does not match its own checksum"):
        load(tmp_path, SmallCNN)
    m["manifest_sha256"] = manifest_digest(m)  # a writer that signs what it wrote: the parts' own checks then speak
    (tmp_path / "manifest.json").write_text(json.dumps(m, indent=3))  # layout and key order are not content
    with pytest.raises(ArtifactError) as err:
        load(tmp_path, SmallCNN)
    assert "own checksum" not in str(err.value)


def test_a_manifest_without_its_checksum_loads_with_a_warning(cnn_artifact, tmp_path):
    """A format-2 manifest stripped of manifest_sha256 (or written before save signed it) loaded silently, any edit
    to it uncaught; it loads (the weights file is still checked), and says its content is unchecked."""
    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x)
    m = json.loads((tmp_path / "manifest.json").read_text())
    del m["manifest_sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="has no manifest_sha256, so edits to it after save cannot be caught"):
        loaded = load(tmp_path, SmallCNN)
    loaded.eval(), model.eval()
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_truncated_manifest_fails(cnn_artifact, tmp_path):
    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x)
    m = tmp_path / "manifest.json"
    m.write_text(m.read_text()[:100])
    with pytest.raises(ArtifactError, match=r"manifest\.json.*JSON"):
        load(tmp_path, SmallCNN)


def test_other_version_fails(cnn_artifact, tmp_path):
    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x)
    m = tmp_path / "manifest.json"
    data = json.loads(m.read_text())
    data["format_version"] = 99
    m.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"manifest\.json.*format_version 99"):
        load(tmp_path, SmallCNN)


def test_wrong_builder_fails(cnn_artifact):
    _, _, path, _, _ = cnn_artifact

    class Wider(SmallCNN):
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Linear(32, 12)

    with pytest.raises(ArtifactError, match=r"fc2\.weight.*\(10, 16\)"):
        load(path, Wider)
    with pytest.raises(ArtifactError, match=r"builder is a model.*load\(path, build\), not load\(path, build\(\)\)"):
        load(path, SmallCNN())  # was a TypeError from inside the model's forward


def test_weights_off_grid_rejected(tmp_path):
    x = example_input()
    model, spec = fake_finalize(MLP(), x, prune=0)
    model.fc1.weight.data += 0.3 * spec.layers["fc1"].scale[:, None]
    with pytest.raises(ArtifactError, match="fc1.*grid"):
        save(model, spec, tmp_path, example_inputs=x)


def test_history_needs_example_inputs(tmp_path):
    x = example_input()
    model, spec = fake_finalize(MLP(), x)
    with pytest.raises(ArtifactError, match="example_inputs"):
        save(model, spec, tmp_path)


def test_per_tensor_scale_is_accepted(tmp_path):
    x = example_input()
    model, spec = fake_finalize(MLP(), x, prune=0)
    s = spec.layers["fc2"].scale.max()
    model.fc2.weight.data = torch.round(model.fc2.weight.data / s).clamp(-7, 7) * s
    spec.layers["fc2"].scale = s.reshape(1)
    save(model, spec, tmp_path, example_inputs=x)
    loaded = load(tmp_path, MLP)
    assert torch.equal(loaded.fc2.weight, model.fc2.weight)


def test_container_of_a_4_layer_model_costs_at_most_200_bytes(tmp_path):
    from jointcompress.models import LeNet5

    x = torch.randn(1, 1, 28, 28)
    model, spec = fake_finalize(LeNet5(), x, prune=0, zero_fraction=0.99)
    assert len(spec.layers) == 4
    manifest = save(model, spec, tmp_path, builder=LeNet5, example_inputs=x)
    assert manifest["bytes"]["container"] <= 200
    assert (tmp_path / "weights.jcw").stat().st_size == manifest["bytes"]["total"] + manifest["bytes"]["container"]


def _rewrite_weights(path, data: bytes) -> None:
    """Replace the weights file and make the manifest agree, as a careless copy tool might."""
    import hashlib

    (path / "weights.jcw").write_bytes(data)
    m = json.loads((path / "manifest.json").read_text())
    m["weights_sha256"], m["weights_file_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    m["manifest_sha256"] = manifest_digest(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage,message", [
    (lambda d: d[:20] + bytes([d[20] ^ 0x10]) + d[21:], "CRC-32"),
    (lambda d: b"XYZ" + d[3:], "bad magic"),
    (lambda d: d[:3] + b"\x07" + d[4:], "container version 7"),
])
def test_damaged_container_is_refused_even_with_a_matching_manifest(cnn_artifact, tmp_path, damage, message):
    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x)
    _rewrite_weights(tmp_path, damage((tmp_path / "weights.jcw").read_bytes()))
    with pytest.raises(ArtifactError, match=rf"weights\.jcw.*{message}"):
        load(tmp_path, SmallCNN)


def test_version_1_artifacts_still_load(cnn_artifact, tmp_path):
    """A version-1 artifact (safetensors, fp32 scales, biases among the other tensors) reads as before."""
    import hashlib

    from safetensors.torch import save as st_save

    model, spec, _, _, x = cnn_artifact
    v2 = save(model, spec, tmp_path / "v2", example_inputs=x, entropy=False, container="safetensors")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "v2" / "weights.safetensors")
    layers, others = v2["layers"], dict(v2["other_tensors"])
    for name, rec in layers.items():
        scale, bias = rec["parts"]["scale"], rec["parts"].pop("bias")
        tensors[scale["key"]] = spec.layers[name].scale.float().clone()
        del scale["format"], scale["channels"]
        scale.update(bytes=4 * rec["shape"][0], raw_bytes=4 * rec["shape"][0])
        del tensors[bias["key"]]  # v1 kept the bias as a plain fp32 tensor under the same name
        tensors[f"{name}.bias"] = getattr(model, name).bias.detach().clone()
        others[f"{name}.bias"] = {"shape": [rec["shape"][0]], "dtype": "float32", "bytes": 4 * rec["shape"][0]}
    blob = st_save(tensors)
    v1 = {k: v for k, v in v2.items() if k not in ("container", "blob_keys", "bytes", "manifest_sha256")}
    v1.update(format_version=1, weights_file="weights.safetensors", other_tensors=others,
              weights_sha256=hashlib.sha256(blob).hexdigest(), weights_file_bytes=len(blob))
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "weights.safetensors").write_bytes(blob)
    (tmp_path / "v1" / "manifest.json").write_text(json.dumps(v1))
    loaded = load(tmp_path / "v1", SmallCNN)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_any_damage_behind_a_valid_checksum_is_an_artifact_error_or_harmless(cnn_artifact, tmp_path):
    """A file rewritten with valid CRC and sha256 (a buggy writer, a malicious file) never
    crashes the loader with anything but ArtifactError."""
    import random
    import struct as st
    import zlib

    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x)
    good = (tmp_path / "weights.jcw").read_bytes()
    rng = random.Random(0)
    for i in range(60):
        data = bytearray(good[:-4])
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(data)) if i % 3 else rng.randrange(min(40, len(data)))
            data[pos] = rng.randrange(256)
        data += st.pack("<I", zlib.crc32(bytes(data)) & 0xFFFFFFFF)
        _rewrite_weights(tmp_path, bytes(data))
        try:
            load(tmp_path, SmallCNN)
        except ArtifactError:
            pass


def test_a_pruning_history_that_cannot_be_replayed_names_what_failed_not_which_techniques_to_train(monkeypatch):
    """bench with --data of another image size rebuilt the model for those images; the replay's trace then failed
    and the message advised prune_unstructured / prune_heads, which have nothing to do with loading an artifact."""
    import jointcompress.graph as graph
    from jointcompress.artifact.store import _replay
    from jointcompress.errors import ArtifactError, UnsupportedModelError

    def untraceable(model, example_inputs, ignored=None):
        try:
            raise RuntimeError("Kernel size can't be greater than actual input size")
        except RuntimeError as exc:
            raise UnsupportedModelError("structured pruning cannot trace it. Use prune_unstructured / quant_lsq") from exc

    monkeypatch.setattr(graph, "build_graph", untraceable)
    with pytest.raises(ArtifactError, match=r"failed \(RuntimeError: Kernel size.*\); is the builder the same .*--data") as err:
        _replay(torch.nn.Linear(2, 2), [["0", False, [0]]], (torch.zeros(1, 2),), "art")
    assert "prune_unstructured" not in str(err.value)


def _dead_channel_model(bias_format: str):
    """A finalized MLP whose first layer has 10 channels without a kept weight (5 of them with a bias) and whose
    last layer (no bias) has 4; the spec and logits as finalize leaves them."""
    from jointcompress import finalize, prepare

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4, "bias_format": bias_format}]}, total_steps=1)
    with torch.no_grad():
        model[0].parametrizations.weight.original[:10] = 0
        model[2].parametrizations.weight.original[3:7] = 0
        bias = model[0].parametrizations.bias.original if hasattr(model[0].parametrizations, "bias") else model[0].bias
        bias[:5] = 0
        bias[5:10] = 0.25  # no weight but a bias: its step is needed where the bias is stored as a multiple of it
    spec = finalize(model)
    return model, spec


@pytest.mark.parametrize("bias_format", ["fp16", "int"])
def test_the_steps_of_channels_without_a_weight_or_a_bias_are_not_stored_and_load_unchanged(tmp_path, bias_format):
    """A channel that keeps no weight computes its bias whatever its step (unless the bias is an int multiple
    of it): at aggressive targets most channels of small layers die, and their steps were stored anyway."""
    from jointcompress.artifact import precision

    model, spec = _dead_channel_model(bias_format)
    x = torch.randn(4, 16)
    with torch.no_grad():
        out = model(x)
    first, last = spec.layers["0"].scale, spec.layers["2"].scale
    dead = 5 if bias_format == "int" else 10  # finalize gives a dead channel the first live one's step
    assert torch.equal(first[:dead], first[dead].expand(dead)) and torch.equal(last[3:7], last[0].expand(4))
    builder = lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))  # noqa: E731
    for container in ("jcw", "safetensors"):
        manifest = save(model, spec, tmp_path / container, container=container)
        steps = {n: manifest["layers"][n]["parts"]["scale"] for n in ("0", "2")}
        live = 27 if bias_format == "int" else 22  # an fp16 bias needs no step; an int one is a multiple of it
        assert manifest["layers"]["0"]["parts"]["bias"]["format"] == bias_format
        assert steps["0"]["live_only"] and steps["0"]["channels"] == live and steps["2"]["channels"] == 4
        for n, rec in steps.items():  # fewer raw bytes than every channel's step in the same format
            assert rec["raw_bytes"] < len(precision.encode_scale(spec.layers[n].scale)[0])
        loaded, loaded_spec = load_with_spec(tmp_path / container, builder)
        with torch.no_grad():
            assert torch.equal(loaded(x), out)
        for n in ("0", "2"):
            assert torch.equal(loaded_spec.layers[n].scale, spec.layers[n].scale), n
    path = tmp_path / "jcw" / "manifest.json"
    for field, value in (("live_only", "yes"), ("channels", 32)):
        manifest = json.loads(path.read_text())
        manifest["layers"]["0"]["parts"]["scale"][field] = value
        edited = tmp_path / f"edited_{field}"
        edited.mkdir()
        (edited / "manifest.json").write_text(json.dumps(manifest))
        (edited / "weights.jcw").write_bytes((tmp_path / "jcw" / "weights.jcw").read_bytes())
        with pytest.raises(ArtifactError, match=rf"layers\['0'\]\.parts\.scale\.{field}"):
            load(edited, builder)


def test_a_layer_without_a_live_channel_stores_one_step():
    from jointcompress.artifact.encode import filled_steps, live_channels, stored_steps

    q = torch.zeros(6, 3, dtype=torch.int8)
    steps, live_only = stored_steps(torch.arange(1.0, 7.0), live_channels(q, None))
    assert live_only and steps.tolist() == [1.0]
    assert filled_steps(steps, live_channels(q, None)).tolist() == [1.0] * 6
    q[2, 1] = 3
    bias = torch.tensor([0.0, 0, 0, 0, 0.5, 0])
    assert live_channels(q, bias, int_bias=False).tolist() == [False, False, True, False, False, False]
    live = live_channels(q, bias, int_bias=True)  # an int bias is a multiple of its channel's step
    assert live.tolist() == [False, False, True, False, True, False]
    assert torch.equal(live_channels(q, bias, torch.full((6,), 0.25)), live)  # 0.5 = 2 x 0.25: the writer picks int
    assert filled_steps(*[stored_steps(torch.arange(1.0, 7.0), live)[0], live]).tolist() == [3.0, 3.0, 3.0, 3.0, 5.0, 3.0]


def test_a_safetensors_file_over_a_target_its_jcw_file_meets_names_the_container(cnn_artifact, tmp_path):
    """The budget measures the default container; a safetensors file of the same model was 5-44% over the
    target and the warning blamed the fine-tuning or the channel floor."""
    model, spec, _, _, x = cnn_artifact
    compact = save(model, spec, tmp_path / "a", example_inputs=x)["weights_file_bytes"]
    recorded = copy.copy(spec)
    recorded.recipe = {"techniques": [{"type": "size_budget", "target_bytes": float(compact)}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wide = save(model, recorded, tmp_path / "b", example_inputs=x, container="safetensors")["weights_file_bytes"]
    said = [str(w.message) for w in caught if "over the size target" in str(w.message)]
    assert wide > compact and len(said) == 1
    assert f"where this model's file is {compact:,} B" in said[0] and "container='jcw'" in said[0]


def test_saving_onto_a_file_path_names_it(tmp_path):
    """An artifact is a folder: a path that is a file (or lies under one) ended in pathlib's FileExistsError."""
    from jointcompress.errors import ArtifactError
    from jointcompress.spec import CompressionSpec

    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    (tmp_path / "model.jcw").write_text("kept")
    for given in (tmp_path / "model.jcw", tmp_path / "model.jcw" / "inside"):
        with pytest.raises(ArtifactError, match=r"an artifact is a folder.*model.jcw is a file"):
            save(model, CompressionSpec(layers={}), given)
    assert (tmp_path / "model.jcw").read_text() == "kept"


def test_a_run_folder_given_for_its_artifact_names_the_artifact_inside(tmp_path):
    """`bench runs/x` (the run's folder, not runs/x/artifact) said only that manifest.json was not found."""
    from jointcompress.errors import ArtifactError
    from jointcompress.spec import CompressionSpec

    save(torch.nn.Sequential(torch.nn.Linear(4, 2)), CompressionSpec(layers={}), tmp_path / "run" / "artifact")
    with pytest.raises(ArtifactError, match=r"is a run's folder: its artifact is .*run/artifact"):
        read_manifest(tmp_path / "run")
    for seed in (0, 1):  # a compare's folder: its points' artifacts are named (it said nothing of them)
        save(torch.nn.Sequential(torch.nn.Linear(4, 2)), CompressionSpec(layers={}),
             tmp_path / "cmp" / "runs" / f"joint-r10-s{seed}" / "artifact")
    with pytest.raises(ArtifactError, match=r"the artifacts in it \(2\): .*joint-r10-s0/artifact"):
        read_manifest(tmp_path / "cmp")
    with pytest.raises(ArtifactError, match=r"nothere: no such folder"):  # it read "manifest.json: not found"
        read_manifest(tmp_path / "nothere")


@pytest.mark.parametrize("container, users", [("jcw", "weights.safetensors"), ("safetensors", "manifest.json"),
                                              ("jcw", "manifest.json")])
def test_a_save_into_a_folder_of_the_users_files_of_its_names_is_refused_and_keeps_them(cnn_artifact, tmp_path,
                                                                                       container, users):
    """save() into the folder holding a model's weights.safetensors deleted it as "a stale file of the other
    container", and replaced a manifest.json of the user's own, without a word."""
    from safetensors.torch import save_file

    model, spec, _, _, x = cnn_artifact
    if users == "weights.safetensors":
        save_file(SmallCNN().state_dict(), tmp_path / users)
    else:
        (tmp_path / users).write_text('{"mine": true}')
    before = (tmp_path / users).read_bytes()
    with pytest.raises(ArtifactError, match=rf"holds {users}, which no save of this package wrote"):
        save(model, spec, tmp_path, example_inputs=x, container=container)
    assert (tmp_path / users).read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [users]


def test_a_save_in_the_other_container_replaces_the_earlier_artifacts_weights(cnn_artifact, tmp_path):
    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x, container="safetensors")
    save(model, spec, tmp_path, example_inputs=x, container="safetensors")  # its own files: replaced
    save(model, spec, tmp_path, example_inputs=x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "weights.jcw"]
    with torch.no_grad():
        assert torch.equal(load(tmp_path, SmallCNN)(x), model(x))


def test_a_builder_that_returns_no_model_is_named(cnn_artifact, tmp_path):
    """load(path, builder) with a builder missing its `return` ended in "'NoneType' object has no attribute
    'named_parameters'" from deep inside the load."""
    model, spec, _, _, x = cnn_artifact
    save(model, spec, tmp_path, example_inputs=x)
    with pytest.raises(ArtifactError, match=r"the builder returned NoneType, not a torch.nn.Module \(a missing `return`\?\)"):
        load(tmp_path, lambda: None)


def test_load_without_a_builder_names_the_function_and_what_the_manifest_records(cnn_artifact):
    """load(path), load(path, None) and load(path, "lenet5") ended in bare TypeErrors ("'str' object is not
    callable"), for a receiver who never saw the run that built the model."""
    from jointcompress.artifact import load
    from jointcompress.errors import ArtifactError

    path = cnn_artifact[2]
    for given in ((), (None,), ("lenet5",)):
        with pytest.raises(ArtifactError, match=r"pass the function that builds the model's architecture.*example "
                                                r"inputs of shape \[1, "):
            load(path, *given)

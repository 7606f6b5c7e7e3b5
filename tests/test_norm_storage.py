"""Normalization layers stored in fp16 and trained as stored (quant_lsq.norm_format: fp16): the
writer keeps fp16-valued fp32 tensors in half the bytes, bit for bit, and a run evaluates what
the file holds."""
import copy
import re

import pytest
import torch
import torch.nn as nn

from jointcompress.api import compress
from jointcompress.artifact.store import load, save
from jointcompress.data import evaluator, load_digits
from jointcompress.errors import RecipeError
from jointcompress.finalize import finalize
from jointcompress.recipe import parse_recipe
from jointcompress.spec import CompressionSpec
from jointcompress.targets import TargetError, target_bytes
from jointcompress.techniques.norm_storage import attach_norm_storage, detach_norm_storage, round_norms


class NormNet(nn.Module):
    """A small CNN with BatchNorm and LayerNorm, on the 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.norm = nn.LayerNorm(16 * 16)
        self.fc1, self.fc2 = nn.Linear(16 * 16, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(torch.relu(self.fc1(self.norm(x.flatten(1)))))


NORM_KEYS = ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn2.weight", "bn2.bias",
             "bn2.running_mean", "bn2.running_var", "norm.weight", "norm.bias")


def _fp16_valued(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.half().float(), t))


@pytest.fixture(scope="module")
def teacher():
    split = load_digits()
    torch.manual_seed(0)
    model = NormNet()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x, y = split.x_train, split.y_train
    for _ in range(3):
        for i in range(0, len(y), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return split, model.eval()


def test_the_writer_stores_fp16_valued_tensors_in_half_the_bytes_and_loads_them_exactly(teacher, tmp_path):
    split, model = teacher
    model = copy.deepcopy(model)
    assert not _fp16_valued(model.bn1.running_var)  # trained in fp32: stored as it is
    wide = save(model, CompressionSpec(), tmp_path / "wide", example_inputs=split.x_test[:2])
    round_norms(model)
    manifest = save(model, CompressionSpec(), tmp_path / "narrow", example_inputs=split.x_test[:2])
    others, before = manifest["other_tensors"], wide["other_tensors"]
    for key in NORM_KEYS:
        assert others[key]["dtype"] == "float16" and others[key]["loaded_as"] == "float32"
        assert others[key]["bytes"] == before[key]["bytes"] // 2
    assert others["conv1.weight"]["dtype"] == "float32" and "loaded_as" not in others["conv1.weight"]
    steps = int(model.bn1.num_batches_tracked)  # the count of batches it trained on: int64, stored narrowest
    assert others["bn1.num_batches_tracked"] == {"shape": [], "dtype": "int8" if steps < 128 else "int16",
                                                 "bytes": 1 if steps < 128 else 2, "loaded_as": "int64"}
    saved = sum(before[k]["bytes"] for k in NORM_KEYS) // 2
    assert wide["weights_file_bytes"] - manifest["weights_file_bytes"] >= saved - 16  # the container's varints may differ
    loaded = load(tmp_path / "narrow", NormNet)
    for key, t in model.state_dict().items():
        assert loaded.state_dict()[key].dtype == t.dtype and torch.equal(loaded.state_dict()[key], t), key
    assert torch.equal(loaded(split.x_test[:64]), model.eval()(split.x_test[:64]))


def test_an_edited_loaded_as_is_refused_naming_the_field(teacher, tmp_path):
    split, model = teacher
    model = copy.deepcopy(model)
    round_norms(model)
    save(model, CompressionSpec(), tmp_path / "a", example_inputs=split.x_test[:2])
    _refused_once_edited(tmp_path / "a", "bn1.running_var", "loaded_as", "int8")


@pytest.mark.parametrize("count, stored", [(0, "int8"), (300, "int16"), (40_000, "int32"), (2 ** 40, "int64")])
def test_an_integer_tensor_is_stored_in_the_narrowest_integer_type_that_holds_it_and_loads_exactly(
        teacher, tmp_path, count, stored):
    """BatchNorm's int64 batch counter cost 8 bytes per layer (2.6% of a 20x MobileNetV2's file in its 52
    BatchNorms); any count loads back as the int64 it was, in both containers."""
    split, model = teacher
    model = copy.deepcopy(model)
    model.bn2.num_batches_tracked.fill_(count)
    for container in ("jcw", "safetensors"):
        manifest = save(model, CompressionSpec(), tmp_path / container, example_inputs=split.x_test[:2], container=container)
        rec = manifest["other_tensors"]["bn2.num_batches_tracked"]
        assert rec["dtype"] == stored and rec["bytes"] == torch.empty(0, dtype=getattr(torch, stored)).element_size()
        assert rec.get("loaded_as") == (None if stored == "int64" else "int64")
        loaded = load(tmp_path / container, NormNet).bn2.num_batches_tracked
        assert loaded.dtype == torch.int64 and int(loaded) == count
    _refused_once_edited(tmp_path / "jcw", "bn1.num_batches_tracked", "loaded_as", "int8")  # not narrower than int8
    _refused_once_edited(tmp_path / "jcw", "bn1.num_batches_tracked", "loaded_as", "float32")


def _refused_once_edited(folder, key: str, field: str, value) -> None:
    """The artifact in `folder`, its manifest's record of `key` given `field: value`, fails to load naming the field."""
    import json

    from jointcompress.errors import ArtifactError

    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["other_tensors"][key][field] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=re.escape(f"other_tensors[{key!r}].{field}")):
        load(folder, NormNet)


def _recipe(norm_format="fp16", **extra):
    """4-bit LSQ + KD; given a target (`extra`), the joint mode's size budget too; norm_format None: the default."""
    fmt = {} if norm_format is None else {"norm_format": norm_format}
    return parse_recipe({"mode": "joint", **extra, "techniques": [
        {"type": "quant_lsq", "bits": 4, **fmt, **({"zero_level": True} if extra else {})},
        *([{"type": "size_budget", "end": 0.6, "freeze": 0.8}] if extra else []),
        {"type": "distill_kd", "cache_teacher": True}],
        "training": {"epochs": 3, "batch_size": 32, "lr": 0.002}})


def test_a_run_with_fp16_norms_evaluates_what_the_file_stores(teacher, tmp_path):
    split, model = teacher
    student = copy.deepcopy(model)
    start = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    result = compress(student, _recipe(), (split.x_train, split.y_train), evaluator(split.x_test, split.y_test),
                      teacher=model)
    assert set(next(t for t in result.techniques if t.kind == "quant_lsq").norm_layers) == {"bn1", "bn2", "norm"}
    student.eval()
    for key in start:  # the statistics kept training, and hold fp16 values after every update
        assert not torch.equal(student.state_dict()[key], start[key]), key
        assert _fp16_valued(getattr(student, key.split(".")[0]).get_buffer(key.split(".")[1])), key
    for name in ("bn1", "bn2", "norm"):
        assert _fp16_valued(getattr(student, name).weight.detach()) and _fp16_valued(getattr(student, name).bias.detach())
    masked = student(split.x_test[:64]).detach()
    spec = finalize(student, result.example_inputs)
    assert not any(True for m in student.modules() for _ in m._forward_hooks.values())  # no hook left behind
    assert torch.equal(student(split.x_test[:64]), masked)  # finalize changes no logit
    manifest = save(student, spec, tmp_path / "a", example_inputs=result.example_inputs)
    assert all(manifest["other_tensors"][k]["dtype"] == "float16" for k in NORM_KEYS)
    assert torch.equal(load(tmp_path / "a", NormNet)(split.x_test[:64]), masked)  # and the file gives them back
    assert result.metrics["accuracy"] > 0.8


def _sequential(target, norm_format="auto"):
    return parse_recipe({"mode": "sequential", "target": target, "techniques": [
        {"type": "prune_unstructured", "sparsity": 0.9, "end": 0.6},
        {"type": "quant_lsq", "bits": 4, "start": 0.3, "norm_format": norm_format},
        {"type": "distill_kd", "cache_teacher": True}],
        "training": {"epochs": 3, "batch_size": 32, "lr": 0.002}})


@pytest.mark.parametrize("mode,norm_format", [("joint", None), ("sequential", None), ("joint", "fp16_folded"),
                                              ("sequential", "fp16_folded")])
def test_a_size_target_counts_the_norms_at_their_stored_bytes(teacher, tmp_path, mode, norm_format):
    # norm_format left at its default (auto): fp16 under a size target;
    # sequential: the allocator and the steering (before quantization starts) measure them as stored too;
    # folded, each BatchNorm is two tensors, not four (counted as four, the sequential file landed 3.1% under)
    split, model = teacher
    student = copy.deepcopy(model)
    target = {"ratio": 16.0}  # about a quarter of the file is norms, stored in fp16
    recipe = (_recipe(norm_format=norm_format, target=target) if mode == "joint"
              else _sequential(target, norm_format or "auto"))
    result = compress(student, recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test), teacher=model)
    manifest = save(student, finalize(student, result.example_inputs), tmp_path / "t", example_inputs=result.example_inputs)
    goal = target_bytes(model, recipe.target)
    assert abs(manifest["weights_file_bytes"] - goal) / goal < 0.02
    assert all(manifest["other_tensors"][k]["dtype"] == "float16" for k in NORM_KEYS if "running" not in k or not norm_format)
    assert manifest.get("folded_norms", []) == (["bn1", "bn2"] if norm_format else [])


def test_a_copy_keeps_its_rounding_and_detaching_it_leaves_the_original_alone(teacher):
    _, model = teacher
    live = copy.deepcopy(model)
    attach_norm_storage(live)
    twin = copy.deepcopy(live)
    detach_norm_storage(twin.bn1)
    live.train()(torch.randn(8, 1, 8, 8) * 3 + 1)  # a training forward moves the statistics: still fp16 values
    assert _fp16_valued(live.bn1.running_mean) and _fp16_valued(live.bn1.running_var)
    twin.train()(torch.randn(8, 1, 8, 8) * 3 + 1)
    assert not _fp16_valued(twin.bn1.running_var) and _fp16_valued(twin.bn2.running_var)


def test_norm_format_is_checked():
    with pytest.raises(RecipeError, match="norm_format"):
        parse_recipe({"techniques": [{"type": "quant_lsq", "norm_format": "fp8"}]})


def _stored(recipe: dict) -> str:
    return parse_recipe(recipe).technique("quant_lsq").stored_norm_format


def test_auto_norm_format_is_fp16_under_a_size_target_only():
    quant = [{"type": "quant_lsq"}]
    assert _stored({"techniques": quant}) == "fp32"
    assert _stored({"target": {"ratio": 20}, "techniques": quant}) == "fp16"
    assert _stored({"target": {"size_kb": 30}, "techniques": quant}) == "fp16"
    assert _stored({"target": {"latency_ms": 1.0, "batch": 1}, "techniques": quant}) == "fp32"
    budget = [{"type": "quant_lsq", "zero_level": True}, {"type": "size_budget", "target_bytes": 4096}]
    assert _stored({"techniques": budget}) == "fp16"
    assert _stored({"target": {"ratio": 20}, "techniques": [{"type": "quant_lsq", "norm_format": "fp32"}]}) == "fp32"
    # kept as `auto` in the recipe: a copy given a target (as `compare` makes one per ratio) resolves it again
    base = parse_recipe({"techniques": quant})
    assert base.model_dump()["techniques"][0]["norm_format"] == "auto"
    assert _stored({**base.model_dump(), "target": {"ratio": 20}}) == "fp16"


def test_auto_scale_format_is_log8_under_a_size_target_only():
    """Step sizes in one byte where a size target makes every byte count (a quarter of LeNet-5's file at
    400x in fp16), fp16 elsewhere; resolved by the recipe as norm_format is, and an explicit format wins."""
    def stored(recipe: dict) -> str:
        return parse_recipe(recipe).technique("quant_lsq").stored_scale_format

    quant = [{"type": "quant_lsq"}]
    assert stored({"techniques": quant}) == "fp16"
    assert stored({"target": {"ratio": 20}, "techniques": quant}) == "log8"
    assert stored({"target": {"size_kb": 30}, "techniques": quant}) == "log8"
    assert stored({"target": {"latency_ms": 1.0, "batch": 1}, "techniques": quant}) == "fp16"
    assert stored({"techniques": [{"type": "quant_lsq", "zero_level": True},
                                  {"type": "size_budget", "target_bytes": 4096}]}) == "log8"
    assert stored({"target": {"ratio": 20}, "techniques": [{"type": "quant_lsq", "scale_format": "fp16"}]}) == "fp16"
    assert stored({"techniques": [{"type": "quant_lsq", "scale_format": "log8"}]}) == "log8"
    base = parse_recipe({"techniques": quant})
    assert base.model_dump()["techniques"][0]["scale_format"] == "auto"
    assert stored({**base.model_dump(), "target": {"ratio": 20}}) == "log8"


def test_a_recipe_without_its_target_keeps_the_formats_the_target_chose():
    """The hf plan trains a copy without the target (its sparsities meet it): the `auto` formats stay as
    the plan measured them, in the copy and in its dump (what a checkpoint stores and a resume reads)."""
    sized = parse_recipe({"target": {"ratio": 16}, "techniques": [{"type": "quant_lsq"}]})
    plain = sized.without_target()
    assert plain.target is None and sized.target is not None
    for recipe in (plain, parse_recipe(plain.model_dump(mode="json"))):
        quant = recipe.technique("quant_lsq")
        assert (quant.stored_scale_format, quant.stored_norm_format) == ("log8", "fp16")
    unsized = parse_recipe({"techniques": [{"type": "quant_lsq", "scale_format": "log8"}]}).without_target()
    assert (unsized.technique("quant_lsq").scale_format, unsized.technique("quant_lsq").norm_format) == ("log8", "fp32")


def test_an_unreachable_target_names_the_norm_format_when_norms_are_wide(teacher):
    split, model = teacher
    for fmt, named in (("fp32", "fp16 stores them in half"), ("fp16", "fp16_folded stores each")):  # fp16: BatchNorm folds
        recipe = _recipe(norm_format=fmt, target={"size_kb": 1.2})
        with pytest.raises(TargetError) as err:
            compress(copy.deepcopy(model), recipe, (split.x_train, split.y_train), lambda m: 0.0, teacher=model)
        said = [hint for hint in ("fp16 stores them in half", "fp16_folded stores each") if hint in str(err.value)]
        assert said == [named], str(err.value)


def test_a_transformers_classifier_stores_its_layernorms_in_fp16(tmp_path):
    pytest.importorskip("transformers")
    from hf_helpers import tiny_tokenizer
    from test_hf_joint import recipe as hf_recipe
    from test_hf_joint import run as hf_run

    from jointcompress.hf.artifact import load_hf_artifact, save_hf_artifact
    from jointcompress.hf.finalize import finalize_hf_with_spec
    from jointcompress.hf.wrapper import SequenceClassifier

    rec = hf_recipe(epochs=1)
    next(t for t in rec["techniques"] if t["type"] == "quant_lsq")["norm_format"] = "fp16"
    result, x, _ = hf_run(rec)
    model = result.model.eval()
    with torch.no_grad():
        masked = model(x)
    hf, spec = finalize_hf_with_spec(model, result.techniques)
    manifest = save_hf_artifact(hf, spec, tmp_path / "art", tiny_tokenizer(tmp_path), ptq_bits=8)
    norms = {k: r for k, r in manifest["other_tensors"].items() if "LayerNorm" in k}
    assert norms and all(r["dtype"] == "float16" and r["loaded_as"] == "float32" for r in norms.values())
    loaded = load_hf_artifact(tmp_path / "art")[0]
    with torch.no_grad():
        assert (SequenceClassifier(loaded).eval()(x) - SequenceClassifier(hf).eval()(x)).abs().max() <= 1e-5
        assert (SequenceClassifier(hf).eval()(x) - masked).abs().max() <= 1e-4  # finalize, then the 8-bit rest: close


def test_folded_batchnorm_is_evaluated_as_stored_and_stored_as_a_scale_and_a_shift(teacher, tmp_path):
    """norm_format: fp16_folded: every evaluation during the run computes each BatchNorm as the
    fp16 scale and shift the file stores; finalize writes them without changing a logit, the
    statistics cost one stored value each, and the file gives the logits back in both containers.
    Such an artifact cannot start another run (its training statistics are gone): refused by name."""
    from jointcompress.errors import ArtifactError
    from jointcompress.pipeline import load_start

    split, model = teacher
    student = copy.deepcopy(model)
    result = compress(student, _recipe("fp16_folded"), (split.x_train, split.y_train),
                      evaluator(split.x_test, split.y_test), teacher=model)
    student.eval()
    masked = student(split.x_test[:64]).detach()
    spec = finalize(student, result.example_inputs)
    assert spec.folded_norms == ["bn1", "bn2"]  # the LayerNorm has no statistics to fold
    assert torch.equal(student(split.x_test[:64]), masked)  # the run evaluated the rounded scale and shift
    for bn in (student.bn1, student.bn2):
        assert not bn.running_mean.any() and bool(((bn.running_var + bn.eps) == 1).all())
        assert _fp16_valued(bn.weight.detach()) and _fp16_valued(bn.bias.detach())
    for container in ("jcw", "safetensors"):
        manifest = save(student, spec, tmp_path / container, example_inputs=result.example_inputs, container=container)
        others = manifest["other_tensors"]
        assert manifest["folded_norms"] == ["bn1", "bn2"]
        for bn in ("bn1", "bn2"):
            assert others[f"{bn}.weight"]["bytes"] == others[f"{bn}.bias"]["bytes"] == 16 * 2
            assert others[f"{bn}.running_mean"] == {"shape": [16], "dtype": "float16", "bytes": 2, "fill": True,
                                                    "loaded_as": "float32"}
            assert others[f"{bn}.running_var"] == {"shape": [16], "dtype": "float32", "bytes": 4, "fill": True}
        loaded = load(tmp_path / container, NormNet)
        assert torch.equal(loaded(split.x_test[:64]), masked)
    with pytest.raises(ArtifactError, match=r"stored folded \(quant_lsq.norm_format: fp16_folded; bn1, bn2\)"):
        load_start(NormNet, tmp_path / "jcw")


def test_a_stored_tensor_is_one_value_only_where_its_format_makes_it_constant(teacher, tmp_path):
    """An untrained BatchNorm's statistics are constant too, but training moves them: stored whole
    (the allocator measures untrained candidates); only a folded layer's are one value. A manifest
    whose fill flag was edited is refused naming the field."""
    from jointcompress.artifact.encode import constant

    split, _ = teacher
    fresh = NormNet().eval()
    manifest = save(fresh, CompressionSpec(), tmp_path / "fresh", example_inputs=split.x_test[:2])
    assert manifest["other_tensors"]["bn1.running_var"]["bytes"] == 16 * 2 and "fill" not in manifest["other_tensors"]["bn1.running_var"]
    assert constant(torch.zeros(3)) and not constant(torch.tensor([0.0, -0.0])) and not constant(torch.ones(1))
    _refused_once_edited(tmp_path / "fresh", "bn1.running_mean", "fill", "yes")


def test_a_size_error_names_the_fold_where_batchnorm_is_in_fp16_already():
    """The hint named fp16 for norms in fp32 and nothing once they were fp16: a depthwise CNN's 2,318 B of
    BatchNorm, the most of its fixed bytes, were not said to halve again with fp16_folded."""
    from jointcompress.techniques.norm_storage import fold_norms, norm_format_hint, round_norms

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    assert "quant_lsq.norm_format: fp16 stores them in half" in norm_format_hint(model)  # fp32 values
    round_norms(model)
    assert "hold about 64 B of it in fp16: quant_lsq.norm_format: fp16_folded" in norm_format_hint(model)
    fold_norms(model)
    assert "fp16_folded" not in norm_format_hint(model)  # folded already

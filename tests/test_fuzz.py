"""Fuzzing the parsers users feed files to: whatever the input, the only exceptions are
JointCompressError subclasses (which the CLI prints as one message), never a crash."""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jointcompress import ArtifactError, JointCompressError, load_recipe, parse_recipe
from jointcompress.artifact.store import load, manifest_digest, read_manifest
from jointcompress.recipe import builtin_recipe

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

scalars = st.none() | st.booleans() | st.integers(-10**6, 10**20) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
KEYS = ["version", "name", "mode", "model", "data", "techniques", "training", "coordination", "sequential", "target",
        "type", "sparsity", "bits", "targets", "exclude", "start", "end", "epochs", "lr", "features", "layer_bits", "layer_sparsity"]
recipe_like = st.recursive(
    scalars | st.sampled_from(["prune_unstructured", "prune_structured", "quant_lsq", "distill_kd", "joint", "*"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5),
    max_leaves=25,
)
BASE = load_recipe(builtin_recipe("demo")).model_dump(mode="json")


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _replace(obj, path, value):
    if not path:
        return value
    obj = copy.deepcopy(obj)
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return obj


@FUZZ
@given(recipe_like)
def test_parse_recipe_only_raises_recipe_errors(data):
    try:
        parse_recipe(data)
    except JointCompressError:
        pass


@FUZZ
@given(st.data())
def test_mutated_valid_recipe_only_raises_recipe_errors(data):
    paths = list(_paths(BASE))
    path = data.draw(st.sampled_from(paths))
    value = data.draw(recipe_like)
    try:
        parse_recipe(_replace(BASE, path, value))
    except JointCompressError:
        pass


@FUZZ
@given(st.text(max_size=200) | st.sampled_from(["a: 2001-13-45\n", "x: !!python/object:os.system [ls]\n", "- [a\n", "\x00\x01", "*a\n"]))
def test_recipe_files_only_raise_recipe_errors(text):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.yaml"
        p.write_text(text, encoding="utf-8", errors="surrogatepass") if "\ud800" not in text else p.write_bytes(b"\xff\xfe")
        try:
            load_recipe(p)
        except JointCompressError:
            pass


@pytest.fixture(scope="module")
def artifact(digits, tmp_path_factory):
    from jointcompress import compress, finalize
    from jointcompress.artifact import save
    from jointcompress.models import LeNet300

    torch.manual_seed(0)
    model = LeNet300(64, 10)
    recipe = {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.3}, {"type": "quant_lsq", "bits": 4}], "training": {"epochs": 1}}
    res = compress(model, recipe, (digits.x_train[:256], digits.y_train[:256]), lambda m: 0.0)
    spec = finalize(model, res.example_inputs)
    path = tmp_path_factory.mktemp("art") / "a"
    save(model, spec, path, example_inputs=res.example_inputs)
    return path


def _builder():
    from jointcompress.models import LeNet300

    return LeNet300(64, 10)


@FUZZ
@given(json_values | st.binary(max_size=64).map(lambda b: b.decode("latin-1")))
def test_random_manifest_only_raises_artifact_errors(value):
    with tempfile.TemporaryDirectory() as d:
        text = value if isinstance(value, str) and not value.startswith("{") else json.dumps(value)
        (Path(d) / "manifest.json").write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            read_manifest(d)
        except JointCompressError:
            pass


def test_manifest_fields_of_the_right_version_but_random_content(artifact):
    """A manifest that passes the version check, each field replaced by random JSON."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    paths = [p for p in _paths(manifest) if p and p[0] != "format" and p[0] != "format_version"]
    failures = []

    @FUZZ
    @given(st.sampled_from(paths), json_values)
    def check(path, value):
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(artifact / "weights.jcw", d)
            edited = _replace(manifest, path, value)
            if path[0] != "manifest_sha256":  # signed, so the checks behind the manifest's checksum run too
                edited["manifest_sha256"] = manifest_digest(edited)
            (Path(d) / "manifest.json").write_text(json.dumps(edited))
            try:
                load(d, _builder)
            except JointCompressError:
                pass
            except Exception as err:  # noqa: BLE001 - collected and reported below
                failures.append((path, value, f"{type(err).__name__}: {err}"))

    check()
    assert not failures, f"{len(failures)} inputs raised something else than ArtifactError, e.g. {failures[:3]}"


@pytest.mark.parametrize("container", [{}, ["jcw"], None, 3])
def test_a_container_field_of_another_type_is_an_artifact_error(artifact, tmp_path, container):
    """The fuzz test found it: a dict there raised TypeError (unhashable) from the membership check."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["container"] = container
    manifest["manifest_sha256"] = manifest_digest(manifest)
    shutil.copy(artifact / "weights.jcw", tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="container"):
        load(tmp_path, _builder)


def _depthwise():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(pruning_history=[["0", True, [99]]]), r"replaying the pruning history .*groups=7"),
    (lambda m: m.update(folded_norms=["0"]), r"folded_norms\[0\] names '0', which is Conv2d, not a BatchNorm"),
    (lambda m: m["layers"]["0"].update(act_bits=8, act_scale=-0.1), r"act_scale must be positive"),
], ids=["index_past_the_channels", "folded_conv", "negative_act_scale"])
def test_a_signed_manifest_edited_past_what_the_model_can_be_is_refused_at_load(tmp_path, edit, words):
    """Each loaded without a word: the first then failed in torch at the model's first call (a depthwise conv's
    groups 7 over 8 channels), the others held a convolution's statistics filled as a norm's, a negative step."""
    from jointcompress.artifact import save
    from jointcompress.spec import CompressionSpec, LayerSpec

    model = _depthwise().eval()
    spec = CompressionSpec(layers={"0": LayerSpec(bits=8, scale=model[0].weight.detach().abs().amax((1, 2, 3)) / 127)})
    with torch.no_grad():
        model[0].weight.copy_((model[0].weight / spec.layers["0"].scale.view(-1, 1, 1, 1)).round()
                              * spec.layers["0"].scale.view(-1, 1, 1, 1))
    save(model, spec, tmp_path / "a", example_inputs=torch.randn(2, 1, 8, 8))
    load(tmp_path / "a", _depthwise)  # as saved: loads
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    edit(manifest)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=words):
        load(tmp_path / "a", _depthwise)

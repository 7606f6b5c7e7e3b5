"""Layers the techniques would select but cannot compress correctly are refused before training, named
with the fix (a weight Parameter also used under another name, the hook-based spectral_norm, an
Embedding's max_norm); what they can compress is not refused: one module under two names is one layer,
an embedding's table is quantized without rounding its token ids, and an EmbeddingBag left out is said."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save as safetensors_save

import jointcompress
from jointcompress.artifact import dense_fp32_bytes, load, save, storage_bytes
from jointcompress.errors import RecipeError, UnsupportedModelError
from jointcompress.session.checks import tied_weights
from session_helpers import train_in_own_loop

PRUNE_QUANT = [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.0}, {"type": "quant_lsq", "bits": 4}]




def finalize_keeps_logits(model: nn.Module, session, x: torch.Tensor) -> float:
    """max |logits after finalize - logits of the trained (masked, fake-quantized) model|."""
    model.eval()
    with torch.no_grad():
        trained = model(x)
    session.finalize()
    with torch.no_grad():
        return float((model(x) - trained).abs().max())


class TiedDecoder(nn.Module):
    """An autoencoder whose decoder is the encoder's weight under a second name, used transposed."""

    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(16, 8), nn.Linear(16, 4)
        self.dec_w = self.enc.weight

    def forward(self, x):
        return self.head(F.relu(self.enc(x)) @ self.dec_w)


class ListedWeight(TiedDecoder):
    """The same tie through a plain attribute (a list), which is no registered parameter."""

    def __init__(self):
        super().__init__()
        del self.dec_w
        self.decoders = [self.enc.weight]

    def forward(self, x):
        return self.head(F.relu(self.enc(x)) @ self.decoders[0])


class TiedTable(nn.Module):
    """An embedding table used again as the output projection through a loose parameter."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.out_w = self.emb.weight

    def forward(self, ids):
        return self.emb(ids).mean(1) @ self.out_w.t()


class SharedLayer(nn.Module):
    """One Linear registered under two names (ALBERT-style sharing written as a second reference)."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.b = self.a

    def forward(self, x):
        return self.head(F.relu(self.b(F.relu(self.a(F.relu(self.inp(x)))))))


class Tokens(nn.Module):
    """Mean of token embeddings, then a Linear; `table` is the embedding module."""

    def __init__(self, table: nn.Module | None = None):
        super().__init__()
        self.emb, self.fc = table if table is not None else nn.Embedding(50, 16), nn.Linear(16, 4)

    def forward(self, ids):
        e = self.emb(ids)
        return self.fc(e if isinstance(self.emb, nn.EmbeddingBag) else e.mean(1))


def _dense_data():
    torch.manual_seed(0)
    return torch.randn(64, 16), torch.randint(0, 4, (64,))


def _token_data(vocab: int = 50):
    torch.manual_seed(0)
    return torch.randint(0, vocab, (32, 6)), torch.randint(0, 4, (32,))


@pytest.mark.parametrize("build, other", [(TiedDecoder, "dec_w"), (ListedWeight, r"decoders\[0\]")],
                         ids=["loose_parameter", "plain_attribute"])
def test_a_weight_used_under_another_name_is_refused_naming_both(build, other):
    x, y = _dense_data()
    with pytest.raises(RecipeError, match=rf"layer 'enc' shares its weight with '{other}'.*'enc' to exclude"):
        jointcompress.prepare(build(), {"techniques": PRUNE_QUANT}, total_steps=3, example_inputs=x[:2])


def test_after_excluding_the_tied_layer_finalize_keeps_the_logits():
    torch.manual_seed(0)
    model, (x, y) = TiedDecoder(), _dense_data()
    recipe = {"techniques": [dict(t, exclude=["enc"]) for t in PRUNE_QUANT]}
    assert finalize_keeps_logits(model, train_in_own_loop(model, recipe, x, y), x[:8]) <= 1e-5


def test_an_embedding_tied_to_a_loose_parameter_is_refused():
    x, y = _token_data(30)
    recipe = {"techniques": [dict(t, embeddings=True) for t in PRUNE_QUANT]}
    with pytest.raises(RecipeError, match=r"layer 'emb' shares its weight with 'out_w'.*'emb' to exclude"):
        jointcompress.prepare(TiedTable(), recipe, total_steps=3, example_inputs=x[:2])


def test_two_tied_modules_name_the_later_one_as_before():
    class Lm(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.lm_head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.wte.weight

    assert tied_weights(Lm()) == {"lm_head": "wte"}


def test_one_module_under_two_names_is_one_layer_and_compresses():
    torch.manual_seed(0)
    model, x, y = SharedLayer(), torch.randn(64, 8), torch.randint(0, 4, (64,))
    assert tied_weights(model) == {}
    recipe = {"techniques": [PRUNE_QUANT[0], dict(PRUNE_QUANT[1], activations=True)]}
    assert finalize_keeps_logits(model, train_in_own_loop(model, recipe, x, y), x[:8]) <= 1e-5
    assert model.b is model.a


def test_one_module_under_two_names_is_stored_and_counted_once(tmp_path):
    torch.manual_seed(0)
    model, x, y = SharedLayer(), torch.randn(64, 8), torch.randint(0, 4, (64,))
    session = train_in_own_loop(model, {"techniques": PRUNE_QUANT}, x, y)
    spec = session.finalize()
    manifest = save(model, spec, tmp_path / "a", builder=SharedLayer)
    assert manifest["aliases"] == {"b.weight": "a.weight", "b.bias": "a.bias"}
    assert not {"b.weight", "b.bias"} & set(manifest["other_tensors"]) and "b" not in manifest["layers"]
    assert manifest["weights_file_bytes"] == storage_bytes(model, spec)["total"] + manifest["bytes"]["container"]
    loaded = load(tmp_path / "a", SharedLayer)
    assert loaded.b is loaded.a and torch.equal(loaded(x), model.eval()(x))
    once = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("b.")}
    assert dense_fp32_bytes(model) == len(safetensors_save(once))  # the "N x smaller" baseline: once too


def test_a_tied_embedding_left_out_is_stored_once_and_loads_tied(tmp_path):
    class Lm(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.mid, self.lm_head = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50, bias=False)
            self.lm_head.weight = self.wte.weight

        def forward(self, ids):
            return self.lm_head(F.relu(self.mid(self.wte(ids).mean(1))))

    torch.manual_seed(0)
    model, (ids, _) = Lm(), _token_data()
    y = torch.randint(0, 50, (ids.shape[0],))
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 4, "exclude": ["wte", "lm_head"]}]}
    spec = train_in_own_loop(model, recipe, ids, y).finalize()
    manifest = save(model, spec, tmp_path / "lm", builder=Lm)
    assert manifest["aliases"] == {"lm_head.weight": "wte.weight"} and list(manifest["layers"]) == ["mid"]
    loaded = load(tmp_path / "lm", Lm)
    assert loaded.lm_head.weight is loaded.wte.weight and torch.equal(loaded(ids), model.eval()(ids))


def test_the_hook_based_spectral_norm_is_refused_with_its_fix():
    x = torch.randn(8, 8)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(UnsupportedModelError, match=r"layer '0' .*spectral_norm's hook.*remove_spectral_norm\(layer\)"):
        jointcompress.prepare(model, {"techniques": PRUNE_QUANT}, total_steps=2, example_inputs=x[:2])
    nn.utils.remove_spectral_norm(model[0])  # the named fix: then it compresses
    jointcompress.prepare(model, {"techniques": PRUNE_QUANT}, total_steps=2, example_inputs=x[:2])


def test_an_embedding_with_max_norm_is_refused_where_it_would_be_compressed():
    x, _ = _token_data()
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 4, "embeddings": True}]}
    with pytest.raises(UnsupportedModelError, match=r"layer 'emb' .*max_norm=0.5.*exclude the layer.*max_norm=None"):
        jointcompress.prepare(Tokens(nn.Embedding(50, 16, max_norm=0.5)), recipe, total_steps=2, example_inputs=x[:2])
    left_out = {"techniques": [{"type": "quant_lsq", "bits": 4}]}  # not selected: nothing to refuse
    jointcompress.prepare(Tokens(nn.Embedding(50, 16, max_norm=0.5)), left_out, total_steps=2, example_inputs=x[:2])


def test_input_quantization_leaves_token_ids_alone_and_quantizes_the_table():
    model, (x, y) = Tokens(), _token_data()
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 4, "embeddings": True, "activations": True}]}
    s = train_in_own_loop(model, recipe, x, y)
    assert not hasattr(model.emb, "input_quant") and hasattr(model.fc, "input_quant")
    assert torch.nn.utils.parametrize.is_parametrized(model.emb, "weight")  # the table is quantized
    assert finalize_keeps_logits(model, s, x[:8]) <= 1e-5


def test_an_embedding_bag_left_out_is_warned():
    x, _ = _token_data()
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 4, "embeddings": True}]}
    with pytest.warns(UserWarning, match=r"EmbeddingBag 'emb' is left out and stored in fp32"):
        jointcompress.prepare(Tokens(nn.EmbeddingBag(50, 16)), recipe, total_steps=2, example_inputs=x[:2])


def test_a_tied_weight_both_of_whose_layers_are_quantized_is_stored_per_layer_and_loads(tmp_path):
    """An Embedding tied to an LM head, both quantized (hf.artifact.quantize_rest did so, as BART's shared
    embeddings): the head's key became an alias of a tensor stored itself, and the saved artifact did not load.
    quantize_rest now rounds the one tensor once (the head its alias); a spec naming both still loads."""
    from jointcompress.hf.artifact import quantize_rest
    from jointcompress.spec import CompressionSpec

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    torch.manual_seed(0)
    model, ids = Tied(), torch.arange(16)
    spec = quantize_rest(model, CompressionSpec(), 8)  # rounds the one tensor once: the head is the table's alias
    manifest = save(model, spec, tmp_path / "t", builder=Tied)
    assert set(manifest["layers"]) == {"emb"} and manifest["aliases"] == {"head.weight": "emb.weight"}
    assert torch.equal(load(tmp_path / "t", Tied)(ids), model(ids))
    both = CompressionSpec(layers={**spec.layers, "head": spec.layers["emb"]})  # each name quantized: stored per layer
    manifest = save(model, both, tmp_path / "both", builder=Tied)
    assert set(manifest["layers"]) == {"emb", "head"} and "aliases" not in manifest
    assert torch.equal(load(tmp_path / "both", Tied)(ids), model(ids))


class SharedBias(nn.Module):
    """Two Linear layers with one bias Parameter (`b.bias = a.bias`), their weights their own."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.b.bias = self.a.bias

    def forward(self, x):
        return self.head(F.relu(self.b(F.relu(self.a(F.relu(self.inp(x)))))))


@pytest.mark.parametrize("first", [PRUNE_QUANT[0], {"type": "prune_structured", "sparsity": 0.5, "end": 0.0}],
                         ids=["unstructured", "structured"])
def test_a_bias_shared_by_two_layers_is_refused_naming_both(first):
    """Finalize wrote the compressed (masked, rounded) bias of one into the shared Parameter, so the
    other changed: logits moved by 0.2 of their scale. Refused before training, either layer named."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    techniques = [first, PRUNE_QUANT[1]]
    with pytest.raises(RecipeError, match=r"layer 'a' shares its bias with 'b.bias'.*own bias"):
        jointcompress.prepare(SharedBias(), {"techniques": techniques}, total_steps=3, example_inputs=x[:2])
    only_a = [dict(t, exclude=["a"]) for t in techniques]
    with pytest.raises(RecipeError, match=r"layer 'b' shares its bias with 'a.bias'"):
        jointcompress.prepare(SharedBias(), {"techniques": only_a}, total_steps=3, example_inputs=x[:2])
    model = SharedBias()
    both = {"techniques": [dict(t, exclude=["a", "b"]) for t in techniques]}
    assert finalize_keeps_logits(model, train_in_own_loop(model, both, x, y), x[:8]) <= 1e-5
    assert model.a.bias is model.b.bias


def test_finalize_refuses_a_bake_that_moves_the_outputs(monkeypatch):
    """The safety net under the checks before training: with the shared-bias refusal switched off, the
    run trains, and finalize, whose baking changed the other layer's bias, refuses instead of handing
    back a model that is not the one measured."""
    import jointcompress.api as api

    monkeypatch.setattr(api, "_refuse_shared_biases", lambda *a: None)
    torch.manual_seed(0)
    model, x, y = SharedBias(), torch.randn(64, 8), torch.randint(0, 4, (64,))
    recipe = {"techniques": [PRUNE_QUANT[0], {**PRUNE_QUANT[1], "bias_format": "int"}]}  # a's bias rounded onto a's grid
    session = train_in_own_loop(model, recipe, x, y)
    with pytest.raises(UnsupportedModelError, match=r"baking the masks and quantizers .* changed the model's outputs"):
        session.finalize(x[:8])


class TiedHeadLm(nn.Module):
    """A language model whose output layer is its embedding table (head.weight = emb.weight)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(50, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(self.emb(ids))))))


def test_structured_pruning_leaves_the_channels_of_a_tied_layer_and_keeps_the_tie():
    """With the tied head excluded (as its refusal says), the channels of fc2, which feed the head,
    were removed anyway: head.weight was sliced into a new Parameter, untied from the embedding, and
    the file stored both tables. That group is skipped, named; fc1's channels are still removed."""
    from jointcompress.graph import discover_groups

    torch.manual_seed(0)
    model, ids = TiedHeadLm(), torch.randint(0, 50, (64, 6))
    groups, skipped = discover_groups(model, ids[:2])
    assert [g.name for g in groups] == ["fc1"]
    assert "'head' shares its weight with 'emb'" in dict(skipped)["fc2"]
    recipe = {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.0, "exclude": ["head"]}]}
    session = train_in_own_loop(model, recipe, ids, torch.randint(0, 50, (64, 6)))
    session.finalize(ids[:2])
    assert model.head.weight is model.emb.weight and model.fc1.out_features == 16 and model.fc2.out_features == 32


def test_a_tied_weight_is_refused_once_for_every_technique_that_selects_it():
    """Refused a technique at a time: a user who added the tied layer to prune_unstructured's exclude met the same
    refusal from quant_lsq next."""
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body = nn.Embedding(50, 16), nn.Linear(16, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.body(self.emb(ids))))

    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4}]}
    with pytest.raises(RecipeError, match=r"layer 'head' shares its weight with 'emb'.*Add 'head' to exclude in "
                                          r"techniques\[0\] \(prune_unstructured\) and techniques\[1\] \(quant_lsq\)"):
        jointcompress.prepare(TiedLM(), recipe, total_steps=4)
    for t in recipe["techniques"]:
        t["exclude"] = ["head"]
    jointcompress.prepare(TiedLM(), recipe, total_steps=4)  # as the refusal said: accepted


class _GroupedThenNormed(nn.Module):
    """A grouped convolution (groups 4 of 16 inputs) whose channels then meet a depthwise convolution and a
    channels-last LayerNorm: no group keeps them."""

    def __init__(self):
        super().__init__()
        self.stem, self.gconv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.bn, self.dw, self.ln = nn.BatchNorm2d(32), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.LayerNorm(32)
        self.pw, self.head = nn.Conv2d(32, 48, 1), nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.gconv(torch.relu(self.stem(x)))))
        x = self.ln(self.dw(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(torch.relu(self.pw(x)).mean((2, 3)))


def test_a_grouped_convolution_left_out_of_every_group_is_named_as_one():
    """A grouped convolution whose channels no group kept was said to be "coupled with a layer that is not pruned
    (e.g. the output layer)", far from the output layer."""
    from jointcompress.graph import discover_groups

    _, skipped = discover_groups(_GroupedThenNormed(), torch.randn(2, 3, 8, 8))
    reasons = dict(skipped)
    assert reasons["gconv"].startswith("a grouped convolution (groups=4)"), reasons
    assert not any("e.g. the output layer" in r for r in reasons.values()), reasons

"""torch's nn.LSTM / nn.GRU / nn.RNN converted to Linear layers (recurrent.rnn_to_linear): the same
function and gradients, compressed like any Linear, saved and loaded, and torch's module back after
finalize (linear_to_rnn)."""
import copy
import warnings

import onnx
import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from jointcompress import JointCompressError, compress, finalize
from jointcompress.artifact import dense_fp32_bytes, load, save
from jointcompress.deploy.onnx_export import export_and_check
from jointcompress.graph import discover_groups
from jointcompress.recurrent import LinearRNN, linear_to_rnn, rnn_to_linear
from jointcompress.targets import TargetError

T, B, IN, H = 5, 3, 6, 8
KINDS = {"lstm": (nn.LSTM, {}), "gru": (nn.GRU, {}), "rnn-tanh": (nn.RNN, {"nonlinearity": "tanh"}),
         "rnn-relu": (nn.RNN, {"nonlinearity": "relu"})}


def _states(state):
    return state if isinstance(state, tuple) else (state,)


def _pair(kind: str, **options):
    torch.manual_seed(0)
    cls, extra = KINDS[kind]
    rnn = cls(IN, H, **{**extra, **options}).eval()
    return rnn, LinearRNN.from_rnn(rnn)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_converted_module_computes_what_torch_computes(kind, batch_first, bidirectional):
    rnn, converted = _pair(kind, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
    x = torch.randn((B, T, IN) if batch_first else (T, B, IN))
    state = torch.randn(2 * (2 if bidirectional else 1), B, H)
    hx = (state, torch.randn_like(state)) if kind == "lstm" else state
    for args in ((x,), (x, hx)):
        want, want_state = rnn(*args)
        got, got_state = converted(*args)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(_states(got_state), _states(want_state), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    back = converted.to_rnn()
    assert type(back) is type(rnn)
    torch.testing.assert_close(back(x)[0], rnn(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gradients_and_unbatched_inputs_match_torch(kind):
    rnn, converted = _pair(kind, num_layers=2, bias=False)
    x = torch.randn(T, IN)  # unbatched
    want, want_state = rnn(x)
    got, got_state = converted(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert [s.shape for s in _states(got_state)] == [s.shape for s in _states(want_state)]
    want.square().sum().backward()
    got.square().sum().backward()
    for layer in range(2):
        for part in ("ih", "hh"):
            torch.testing.assert_close(getattr(converted, f"{part}_l{layer}").weight.grad,
                                       getattr(rnn, f"weight_{part}_l{layer}").grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "rnn-tanh", "gru"])
def test_merged_biases_keep_the_function_with_half_the_bias_tensors(kind):
    cls, extra = KINDS[kind]
    torch.manual_seed(0)
    rnn = cls(IN, H, num_layers=2, bidirectional=True, **extra).eval()
    merged = rnn_to_linear(copy.deepcopy(rnn), merge_biases=True)
    x = torch.randn(T, B, IN)
    torch.testing.assert_close(merged(x)[0], rnn(x)[0], rtol=1e-5, atol=1e-6)
    recurrent_biases = sum(getattr(merged, f"hh_l{k}{s}").bias is not None for k in (0, 1) for s in ("", "_reverse"))
    assert recurrent_biases == (4 if kind == "gru" else 0)  # a GRU's new-gate bias cannot join the input's
    back = linear_to_rnn(merged)
    assert type(back) is cls and (kind == "gru" or not back.bias_hh_l1_reverse.any())
    torch.testing.assert_close(back(x)[0], rnn(x)[0], rtol=1e-5, atol=1e-6)


def test_what_has_no_linear_form_is_refused_by_name():
    model = nn.Sequential(nn.Linear(IN, IN), nn.LSTM(IN, H, proj_size=4))
    with pytest.raises(JointCompressError, match=r"'1': nn.LSTM with proj_size=4"):
        rnn_to_linear(model)
    _, converted = _pair("gru", batch_first=True)
    packed = pack_padded_sequence(torch.randn(B, T, IN), [T, 3, 2], batch_first=True)
    with pytest.raises(JointCompressError, match="PackedSequence"):
        converted(packed)
    rnn, converted = _pair("lstm", num_layers=2)  # wrong shapes: torch's errors, not an IndexError from the loop
    state = torch.zeros(1, B, H)
    for args in ((torch.randn(T, B, IN + 1),), (torch.randn(T, B, IN), (state, state))):
        for module in (rnn, converted):
            with pytest.raises(RuntimeError, match="Expected"):
                module(*args)


class _Tagger(nn.Module):
    """A small sequence classifier: a Linear front, a 2-layer bidirectional LSTM, a Linear head on the last step."""

    def __init__(self, convert: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.front = nn.Linear(IN, 16)
        rnn = nn.LSTM(16, 16, 2, batch_first=True, bidirectional=True)
        self.rnn = rnn_to_linear(rnn) if convert else rnn
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        out, _ = self.rnn(torch.relu(self.front(x)))
        return self.head(out[:, -1])


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, T, IN, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_unconverted_recurrent_weights_are_named_with_the_fix():
    joint = {"mode": "joint", "target": {"ratio": 4}, "training": {"epochs": 1, "batch_size": 8},
             "techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True}, {"type": "size_budget"}]}
    with pytest.warns(UserWarning, match="rnn_to_linear"), \
            pytest.raises(TargetError, match=r"loose parameters .*'rnn'.*rnn_to_linear"):
        compress(_Tagger(convert=False), joint, _data(), lambda m: 0.0)
    plain = {"training": {"epochs": 1, "batch_size": 8}, "techniques": [{"type": "quant_lsq", "bits": 8}]}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*rnn_to_linear")
        compress(_Tagger(), plain, _data(), lambda m: 0.0)


def test_a_joint_run_compresses_the_recurrent_weights_and_they_go_back_to_torch(tmp_path):
    recipe = {"mode": "joint", "target": {"ratio": 12}, "training": {"epochs": 8, "batch_size": 8},
              "techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True}, {"type": "size_budget"}]}
    model = _Tagger()
    x, y = _data()
    result = compress(model, recipe, (x, y), lambda m: 0.0)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    with pytest.raises(JointCompressError, match="finalize"):
        linear_to_rnn(copy.deepcopy(model))
    target = dense_fp32_bytes(_Tagger()) / 12  # the fp32 file of the model as built
    spec = finalize(model, result.example_inputs)
    hh = model.rnn.hh_l1_reverse.weight
    assert float((hh == 0).float().mean()) > 0.3  # the recurrent weights were pruned
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=1e-4, atol=1e-5)
    path = tmp_path / "tagger"
    manifest = save(model, spec, path, builder=_Tagger, example_inputs=x[:2])
    assert manifest["weights_file_bytes"] == (path / manifest["weights_file"]).stat().st_size <= target
    loaded = load(path, _Tagger).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), masked, rtol=1e-4, atol=1e-5)
    torch_model = linear_to_rnn(loaded)
    assert type(torch_model.rnn) is nn.LSTM
    assert torch.equal(torch_model.rnn.weight_hh_l1_reverse, hh)
    with torch.no_grad():
        torch.testing.assert_close(torch_model(x), masked, rtol=1e-4, atol=1e-5)
    report = export_and_check(torch_model, tmp_path / "tagger.onnx", x[:2], eval_data=x)  # ONNX Runtime's LSTM op
    assert report.max_abs_logit_diff <= 1e-5
    assert "LSTM" in {node.op_type for node in onnx.load(tmp_path / "tagger.onnx").graph.node}


def test_structured_pruning_leaves_the_recurrent_units_and_shrinks_what_feeds_them(tmp_path):
    model = _Tagger()
    x, y = _data()
    groups, skipped = discover_groups(model, x[:2])
    assert "recurrent module 'rnn'" in dict(skipped)["rnn.hh_l0"]
    assert [g.name for g in groups] == ["front"]
    assert {m.module for m in groups[0].members} == {"front", "rnn.ih_l0", "rnn.ih_l0_reverse"}
    recipe = {"training": {"epochs": 1, "batch_size": 8},
              "techniques": [{"type": "prune_structured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 8}]}
    result = compress(model, recipe, (x, y), lambda m: 0.0)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    spec = finalize(model, result.example_inputs)
    assert model.front.out_features == model.rnn.ih_l0.in_features == 8  # physically removed
    save(model, spec, tmp_path, builder=_Tagger, example_inputs=x[:2])  # the replay is checked here
    loaded = load(tmp_path, _Tagger).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded(x), masked, rtol=1e-4, atol=1e-5)
        back = linear_to_rnn(loaded)  # torch's module takes the narrower input
        assert back.rnn.input_size == 8
        torch.testing.assert_close(back(x), masked, rtol=1e-4, atol=1e-5)


def test_the_builtin_lstm_reads_each_image_row_by_row():
    from jointcompress.models import build_model

    for size in (28, 8):
        model = build_model("lstm", image_size=size)
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
        assert model.rnn.ih_l0.in_features == size
    assert not any(isinstance(m, nn.LSTM) for m in model.modules())  # converted: every weight is a Linear's


class _FinalStates(_Tagger):
    """The usual bidirectional classifier head: the last layer's two final states, concatenated."""

    def forward(self, x):
        self.rnn.flatten_parameters()  # what code written for nn.LSTM calls: a no-op on the converted module
        _, (h_n, _) = self.rnn(torch.relu(self.front(x)))
        return self.head(torch.cat([h_n[-2], h_n[-1]], 1))


def test_structured_pruning_through_concatenated_final_states(tmp_path):
    """The concatenation's input sizes were inferred back through the unrolled loop, which gave up: the
    whole trace failed and the model was refused as one structured pruning cannot trace."""
    model = _FinalStates()
    x, y = _data()
    groups, _ = discover_groups(model, x[:2])
    assert [g.name for g in groups] == ["front"]
    recipe = {"training": {"epochs": 1, "batch_size": 8}, "techniques": [{"type": "prune_structured", "sparsity": 0.5}]}
    result = compress(model, recipe, (x, y), lambda m: 0.0)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    finalize(model, result.example_inputs)
    assert model.front.out_features == model.rnn.ih_l0.in_features == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=1e-4, atol=1e-5)


def test_a_recurrent_module_shared_by_two_names_is_converted_once():
    """A siamese encoder (self.b = self.a): only one name was converted, and the run untied the two."""
    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc_a = nn.GRU(IN, 8, batch_first=True)
            self.enc_b = self.enc_a

        def forward(self, x):
            return self.enc_a(x)[0][:, -1] - self.enc_b(x.flip(1))[0][:, -1]

    torch.manual_seed(0)
    model = Siamese()
    x, _ = _data(4)
    with torch.no_grad():
        before = model(x)
    rnn_to_linear(model)
    assert isinstance(model.enc_a, LinearRNN) and model.enc_b is model.enc_a
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_going_back_to_torch_refuses_layers_that_round_their_inputs():
    """linear_to_rnn dropped the input rounding finalize keeps (quant_lsq activations: true): the logits
    moved by 0.03 with no word."""
    from jointcompress.techniques.quant_lsq import attach_frozen_input_quant

    model = _Tagger()
    attach_frozen_input_quant(model.rnn.hh_l0, 8, 0.05)
    with pytest.raises(JointCompressError, match="round their inputs"):
        linear_to_rnn(model)


def test_pytorch_int8_of_a_converted_module_names_the_fix():
    """FX's TraceError from inside the step loop reached the user raw."""
    from jointcompress.deploy.int8 import quantize_torch
    from jointcompress.errors import UnsupportedModelError

    x, y = _data(8)
    with pytest.raises(UnsupportedModelError, match=r"linear_to_rnn\(model\) first .*'onnxruntime'"):
        quantize_torch(_Tagger().eval(), (x, y), x[:2])


def test_structured_pruning_beside_an_unconverted_gru_names_the_conversion():
    """Torch-Pruning's search raised a bare IndexError on an nn.GRU (an LSTM was already named)."""
    import jointcompress
    from jointcompress.errors import UnsupportedModelError

    class GRUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.gru, self.head = nn.Linear(8, 32), nn.GRU(32, 32, batch_first=True), nn.Linear(32, 4)

        def forward(self, x):
            out, _ = self.gru(torch.relu(self.inp(x)))
            return self.head(out[:, -1])

    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match=r"recurrent layers \(gru\) must be converted first: .*rnn_to_linear"):
        jointcompress.prepare(GRUNet(), {"techniques": [{"type": "prune_structured", "sparsity": 0.5}]}, total_steps=10,
                              example_inputs=torch.randn(4, 6, 8))


def test_int8_of_a_model_put_back_into_torchs_lstm_says_the_recurrent_weights_stay_fp32(tmp_path):
    """ONNX Runtime's quantizer leaves the LSTM operator in fp32; the warning said the spec was made on another
    module tree and that the layers were re-rounded with min/max scales, neither of which happened."""
    import warnings

    from jointcompress.deploy import quantize_int8

    model = _Tagger()
    x, y = _data()
    result = compress(model, {"techniques": [{"type": "quant_lsq", "bits": 8}], "training": {"epochs": 1, "batch_size": 8}},
                      (x, y), lambda m: 0.0)
    spec = finalize(model, result.example_inputs)
    torch_model = linear_to_rnn(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_int8(torch_model, spec, (x, y), x[:2], workdir=tmp_path)
    said = " ".join(str(w.message) for w in caught if "int8:" in str(w.message))
    assert "layers stay fp32: rnn is torch's recurrent module again" in said and "another module tree" not in said


def test_loading_a_recurrent_module_held_the_other_way_names_the_conversion(tmp_path):
    """An artifact of a converted LSTM loaded with a builder that leaves torch's module listed `rnn.ih_l0.weight`
    against `rnn.weight_ih_l0` and advised another --model; a model put back before save was refused without the
    reason. The conversion's order is the fix."""
    from jointcompress.errors import ArtifactError

    recipe = {"training": {"epochs": 1, "batch_size": 16}, "techniques": [{"type": "quant_lsq", "bits": 4}]}
    model = _Tagger()
    x, y = _data()
    result = compress(model, recipe, (x, y), lambda m: 0.0)
    spec = finalize(model, result.example_inputs)
    save(model, spec, tmp_path / "converted", builder=_Tagger, example_inputs=x[:2])
    with pytest.raises(ArtifactError, match=r"holds rnn as Linear layers .* apply rnn_to_linear\(model\) in the builder"):
        load(tmp_path / "converted", lambda: _Tagger(convert=False))
    with pytest.raises(ArtifactError, match=r"rnn is torch's recurrent module again: save the finalized model as "
                                            r"compressed, before linear_to_rnn"):
        save(linear_to_rnn(copy.deepcopy(model)), spec, tmp_path / "put_back", example_inputs=x[:2])
    assert type(linear_to_rnn(load(tmp_path / "converted", _Tagger)).rnn) is nn.LSTM


def test_an_unconverted_recurrent_layer_is_listed_with_the_fix_and_no_group_left_says_so():
    """dry-run listed an nn.LSTM nowhere, and prune_structured on an LSTM model (targets ['*']) was told to widen
    its targets: the LSTM is now a skipped layer with the conversion named, and the refusal names it too."""
    from jointcompress.errors import RecipeError
    from jointcompress.recipe import parse_recipe
    from jointcompress.techniques import build
    from jointcompress.techniques.base import RunContext

    model = _Tagger(convert=False)
    x = torch.randn(2, T, IN)
    _, skipped = discover_groups(model, x)
    reasons = dict(skipped)
    assert "nn.LSTM" in reasons["rnn"] and "rnn_to_linear" in reasons["rnn"], skipped
    recipe = parse_recipe({"techniques": [{"type": "prune_structured", "sparsity": 0.5}]})
    technique = build(recipe.techniques[0])
    with pytest.raises(RecipeError, match=r"no prunable channel group.*convert the recurrent layers \(rnn\) with "
                                          r"rnn_to_linear first") as refused:
        technique.setup(RunContext(model=model, example_inputs=x, total_steps=10))
    assert "widen targets" not in str(refused.value)


def test_a_converted_model_exports_without_a_tracer_warning_about_the_librarys_own_check(tmp_path):
    """ONNX export of a model with a LinearRNN warned that the tracer fixed a value at recurrent.py (its check of
    the input's shape, in the library's code): a warning the user could do nothing about."""
    class Reader(nn.Module):  # the recurrent layer reads the model's input itself
        def __init__(self):
            super().__init__()
            self.rnn, self.head = rnn_to_linear(nn.LSTM(IN, H, batch_first=True)), nn.Linear(H, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = Reader().eval()
    x = torch.randn(4, T, IN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the tracer's own warnings reach the export's check
        report = export_and_check(model, tmp_path / "converted.onnx", x[:2], eval_data=x)
    assert not [str(w.message) for w in caught if "tracer fixed a value" in str(w.message)]
    assert report.max_abs_logit_diff <= 1e-5

"""A jointly compressed HF classifier saved as the packed jointcompress artifact and loaded back."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from hf_helpers import tiny_tokenizer  # noqa: E402
from test_hf_joint import FFN, HEADS, LAYERS, run, synthetic  # noqa: E402

from jointcompress.artifact.store import manifest_digest  # noqa: E402
from jointcompress.errors import ArtifactError  # noqa: E402
from jointcompress.hf.artifact import artifact_bytes, load_hf_artifact, save_hf_artifact  # noqa: E402
from jointcompress.hf.finalize import finalize_hf_with_spec  # noqa: E402
from jointcompress.hf.heads import head_counts  # noqa: E402
from jointcompress.hf.wrapper import SequenceClassifier  # noqa: E402


@pytest.fixture(scope="module")
def finalized():
    result, x, _ = run()
    model = result.model.eval()
    with torch.no_grad():
        masked = model(x)
    hf, spec = finalize_hf_with_spec(model, result.techniques)
    return hf, spec, x, masked


def test_spec_has_the_trained_grid_of_the_kept_rows(finalized):
    hf, spec, x, masked = finalized
    assert len(spec.layers) == LAYERS * 6 and all(ls.bits == 4 for ls in spec.layers.values())
    modules = dict(hf.named_modules())
    for name, ls in spec.layers.items():
        w = modules[name].weight.detach()
        s = ls.scale.reshape(-1)
        assert s.numel() == w.shape[0], name  # step sizes of removed heads / neurons dropped too
        q = w / s[:, None]
        assert (q - q.round()).abs().max() < 1e-3 and q.round().abs().max() <= 7, name
    with torch.no_grad():
        assert torch.allclose(SequenceClassifier(hf).eval()(x), masked, atol=1e-4)


def test_save_load_same_logits_and_bytes_as_stated(finalized, tmp_path):
    hf, spec, x, _ = finalized
    tok = tiny_tokenizer(tmp_path)
    manifest = save_hf_artifact(hf, spec, tmp_path / "art", tok, ptq_bits=8)
    with torch.no_grad():
        saved_logits = SequenceClassifier(hf).eval()(x)  # after quantize_rest: the model as stored
    model, tok2, spec2 = load_hf_artifact(tmp_path / "art", with_spec=True)
    with torch.no_grad():
        loaded = SequenceClassifier(model).eval()(x)
    assert (loaded - saved_logits).abs().max() <= 1e-5
    assert head_counts(model) == head_counts(hf) and sum(head_counts(model)) == LAYERS * HEADS // 2
    assert tok2 is not None and tok2("good movie")["input_ids"] == tok("good movie")["input_ids"]
    sizes = artifact_bytes(tmp_path / "art")
    assert sizes["weights"] == manifest["weights_file_bytes"]
    assert manifest["weights_file_bytes"] == manifest["bytes"]["total"] + manifest["bytes"]["container"]
    layers = manifest["layers"]
    assert layers["bert.encoder.layer.0.attention.self.query"]["bits"] == 4
    assert layers["bert.embeddings.word_embeddings"]["bits"] == 8  # post-training 8-bit, per row
    assert "bert.pooler.dense" in layers and not any(k.startswith("classifier") for k in layers)
    assert spec2.layers["bert.encoder.layer.0.attention.self.query"].bits == 4
    # packed: the stored bytes are far below fp32 for the quantized weights
    fp32 = sum(t.numel() * 4 for t in hf.state_dict().values())
    assert manifest["weights_file_bytes"] < 0.45 * fp32


def test_tampered_hf_artifact_fails_clearly(finalized, tmp_path):
    hf, spec, _, _ = finalized
    save_hf_artifact(hf, spec, tmp_path / "art", None, ptq_bits=None)
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    m["extra"]["hf_config"]["heads_per_layer"] = [HEADS] * LAYERS  # claims unpruned attention
    with pytest.raises(ArtifactError, match="own checksum"):
        (tmp_path / "art" / "manifest.json").write_text(json.dumps(m))
        load_hf_artifact(tmp_path / "art")
    m["manifest_sha256"] = manifest_digest(m)  # signed again: the model's own shape checks speak
    (tmp_path / "art" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="does not fit|shape"):
        load_hf_artifact(tmp_path / "art")
    m["extra"]["kind"] = "other"
    m["manifest_sha256"] = manifest_digest(m)
    (tmp_path / "art" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="extra.kind"):
        load_hf_artifact(tmp_path / "art")


def test_int8_onnx_uses_the_trained_lsq_integers(finalized, tmp_path, caplog):
    """The int8 weights ORT runs are the trained integers; and the export and quantizer print nothing of their own
    (transformers' mask code's tracer note, the exporter's on advanced indexing, ORT's "consider pre-processing" line
    reached every run's user and read as problems)."""
    import logging
    import warnings

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from jointcompress.hf.int8 import OrtClassifier, export_onnx, quantize_onnx_int8, trained_overrides

    hf, spec, _, _ = finalized
    with warnings.catch_warnings(record=True) as said, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        fp32 = export_onnx(hf, tmp_path / "m.onnx", seq_len=12)
        overrides = trained_overrides(fp32, hf, spec)
        q = quantize_onnx_int8(fp32, tmp_path / "m.int8.onnx", overrides)
    assert not [str(w.message)[:80] for w in said if issubclass(w.category, (torch.jit.TracerWarning, UserWarning))]
    assert not [r.getMessage()[:80] for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(overrides) == LAYERS * 6  # every LSQ Linear found in the graph (as MatMul, W^T)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(q)).graph.initializer}
    modules = dict(hf.named_modules())
    src = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fp32)).graph.initializer}
    checked = 0
    for init_name in overrides:
        wt = src[init_name]
        name = next(n for n in spec.layers if np.array_equal(modules[n].weight.detach().numpy().T, wt))
        s = spec.layers[name].scale.reshape(-1).numpy()
        expected = np.round(wt / s[None, :]).astype(np.int8)
        assert np.array_equal(inits[init_name + "_quantized"], expected), name
        assert np.abs(expected).max() <= 7  # the 4-bit integers, stored in int8
        checked += 1
    assert checked == LAYERS * 6
    ids = torch.full((3, 12), 5)
    out = OrtClassifier(q)(ids, torch.ones_like(ids))
    assert out.shape == (3, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("make_name,model_type,prefix", [("tiny_distilbert", "distilbert", "distilbert"),
    ("tiny_roberta", "roberta", "roberta"), ("tiny_electra", "electra", "electra"), ("tiny_deberta", "deberta-v2", "deberta")])
def test_pruned_artifact_round_trip(tmp_path, make_name, model_type, prefix):
    """RoBERTa's pruned model had no class to be rebuilt from: its artifact failed the check at save
    time after the whole run."""
    import hf_helpers
    from hf_helpers import inputs

    from jointcompress.hf.ffn import ffn_widths, prune_ffn
    from jointcompress.hf.heads import prune_heads
    from jointcompress.spec import CompressionSpec

    model = getattr(hf_helpers, make_name)(layers=2, heads=4, ffn=64)
    prune_heads(model, [[0, 2], [1, 2, 3]])
    prune_ffn(model, [list(range(0, 64, 2)), list(range(40))])
    manifest = save_hf_artifact(model, CompressionSpec(), tmp_path / "art", ptq_bits=6)
    assert manifest["extra"]["hf_config"]["model_type"] == f"jointcompress_{model_type}"
    assert manifest["layers"][f"{prefix}.embeddings.word_embeddings"]["bits"] == 6
    x = inputs()
    loaded, tok = load_hf_artifact(tmp_path / "art")
    assert tok is None
    with torch.no_grad():
        a, b = model(**x).logits, loaded(**x).logits
    assert (a - b).abs().max() <= 1e-5
    assert head_counts(loaded) == [2, 3] and ffn_widths(loaded) == [32, 40]
    from jointcompress.commands.bench_cmd import run_bench

    said = r"a Hugging Face model's artifact \(JC\w+ForSequenceClassification\), which .bench. does not time.*summary.json"
    with pytest.raises(ArtifactError, match=said):
        run_bench(tmp_path / "art", None, None)  # "no recipe.model recorded; pass --model" sent users looking


def _joint_run(build, layers: int, epochs: int, techniques: list[dict]):
    """A tiny classifier of `build` compressed with `techniques` and KD from another of its kind: the
    packed inputs, the run's result and the masked model's logits."""
    from jointcompress import api
    from jointcompress.hf.wrapper import accuracy, pack, tensor_loader

    data = synthetic()
    x, y = pack(data["input_ids"], data["attention_mask"]), data["labels"]
    teacher = SequenceClassifier(build(layers=layers, heads=HEADS, ffn=FFN, seed=1))
    student = SequenceClassifier(build(layers=layers, heads=HEADS, ffn=FFN, seed=0))
    rec = {"training": {"epochs": epochs, "batch_size": 16, "lr": 1e-3, "seed": 0},
           "techniques": techniques + [{"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]}
    result = api.compress(student, rec, tensor_loader(data, 16, seed=0), lambda m: {"accuracy": accuracy(m, x, y)},
                          teacher=teacher)
    with torch.no_grad():
        masked = result.model.eval()(x)
    return x, result, masked


def test_distilbert_joint_run_to_artifact_and_int8(tmp_path):
    """DistilBERT through the whole path: heads, FFN neurons and layers pruned with LSQ and KD in
    one loop, finalized, packed, loaded back, and exported to int8 on the trained scales."""
    from hf_helpers import tiny_distilbert

    from jointcompress.hf.ffn import ffn_widths
    from jointcompress.hf.int8 import export_onnx, trained_overrides

    x, result, masked = _joint_run(tiny_distilbert, 3, 3, [
        {"type": "prune_layers", "sparsity": 0.34, "end": 0.6}, {"type": "prune_heads", "sparsity": 0.5, "end": 0.6},
        {"type": "prune_ffn", "sparsity": 0.5, "end": 0.6}, {"type": "quant_lsq", "bits": 4, "targets": ["*transformer.layer.*"]}])
    hf, spec = finalize_hf_with_spec(result.model, result.techniques)
    assert len(hf.distilbert.transformer.layer) == 2 and len(spec.layers) == 2 * 6
    with torch.no_grad():
        assert torch.allclose(SequenceClassifier(hf).eval()(x), masked, atol=1e-4)
    save_hf_artifact(hf, spec, tmp_path / "art", ptq_bits=8)
    loaded, _ = load_hf_artifact(tmp_path / "art")
    assert head_counts(loaded) == head_counts(hf) and ffn_widths(loaded) == ffn_widths(hf)
    with torch.no_grad():
        assert (SequenceClassifier(loaded).eval()(x) - SequenceClassifier(hf).eval()(x)).abs().max() <= 1e-5
    fp32 = export_onnx(loaded, tmp_path / "m.onnx", seq_len=12)
    assert len(trained_overrides(fp32, loaded, spec)) == 2 * 6


def test_deberta_joint_run_prunes_its_own_position_projections_with_the_heads(tmp_path):
    """DeBERTa-v2 with relative-position projections of its own (share_att_key false): they are per
    head, so the heads' removal slices them and the LSQ step sizes the spec keeps for them (the run
    stopped at finalize: "pos_key_proj.scale has 32 entries but the weight has 24 output channels")."""
    from hf_helpers import tiny_deberta

    x, result, masked = _joint_run(tiny_deberta, 2, 2, [
        {"type": "prune_heads", "sparsity": 0.5, "end": 0.6}, {"type": "quant_lsq", "bits": 4, "targets": ["*encoder.layer.*"]}])
    hf, spec = finalize_hf_with_spec(result.model, result.techniques)
    attn = hf.deberta.encoder.layer[0].attention.self
    assert attn.pos_key_proj.out_features == attn.query_proj.out_features == head_counts(hf)[0] * 8 < 32
    name = "deberta.encoder.layer.0.attention.self.pos_key_proj"
    assert spec.layers[name].scale.numel() == attn.pos_key_proj.out_features
    with torch.no_grad():
        assert torch.allclose(SequenceClassifier(hf).eval()(x), masked, atol=1e-4)
    save_hf_artifact(hf, spec, tmp_path / "art", ptq_bits=8)
    loaded, _ = load_hf_artifact(tmp_path / "art")
    with torch.no_grad():
        assert (SequenceClassifier(loaded).eval()(x) - SequenceClassifier(hf).eval()(x)).abs().max() <= 1e-5


def test_a_classifier_trained_on_rounded_inputs_keeps_them_through_finalize_and_the_artifact(tmp_path):
    """quant_lsq activations: true on an HF classifier: finalize and load keep each layer's trained input
    rounding (they dropped it, so the logits moved)."""
    from test_hf_joint import recipe

    rec = recipe(epochs=1)
    rec["techniques"][2] = {"type": "quant_lsq", "bits": 4, "targets": ["*encoder.layer.*"], "activations": True,
                            "act_bits": 3}
    result, x, _ = run(rec)
    model = result.model.eval()
    with torch.no_grad():
        masked = model(x)
    hf, spec = finalize_hf_with_spec(model, result.techniques)
    query = "bert.encoder.layer.0.attention.self.query"
    assert spec.layers[query].act_bits == 3
    with torch.no_grad():  # without the rounding (dropped, or lost with a sliced layer) these moved by 2e-4
        assert (SequenceClassifier(hf).eval()(x) - masked).abs().max() <= 1e-5
    save_hf_artifact(hf, spec, tmp_path / "art", None, ptq_bits=None)
    loaded, _ = load_hf_artifact(tmp_path / "art")
    with torch.no_grad():  # save rounds what it stores narrower (biases, norms) in hf itself: the model as stored
        assert (SequenceClassifier(loaded).eval()(x) - SequenceClassifier(hf).eval()(x)).abs().max() <= 1e-5
    from jointcompress.hf.export import export_folder

    from jointcompress.hf.int8 import quantize_torch_int8

    with torch.no_grad():  # torch's dynamic int8 keeps each layer's rounding (it crashed: the hook lost its module)
        int8 = SequenceClassifier(quantize_torch_int8(loaded)).eval()(x)
        ref = SequenceClassifier(loaded).eval()(x)
        assert (int8 - ref).abs().max() <= 0.05 * ref.abs().max()  # int8 tolerance as in test_deploy
    with pytest.warns(UserWarning, match="does not round the inputs of 12 layers"):  # exported, and says what it lacks
        export_folder(hf, tiny_tokenizer(tmp_path), tmp_path / "folder")
    assert (tmp_path / "folder" / "model.safetensors").is_file()


def test_a_loaded_artifacts_spec_gives_int8_overrides_onnx_runtime_takes(finalized, tmp_path):
    """The spec load_hf_artifact returns names the embedding table (rounded per row at save); its per-row
    override stopped ONNX Runtime ("expected per-tensor quantization overrides, found per-channel")."""
    from jointcompress.hf.int8 import OrtClassifier, export_onnx, quantize_onnx_int8, trained_overrides

    hf, spec, _, _ = finalized
    save_hf_artifact(hf, spec, tmp_path / "art", None, ptq_bits=8)
    model, _, loaded_spec = load_hf_artifact(tmp_path / "art", with_spec=True)
    assert "bert.embeddings.word_embeddings" in loaded_spec.layers
    fp32 = export_onnx(model, tmp_path / "m.onnx", seq_len=12)
    overrides = trained_overrides(fp32, model, loaded_spec)
    assert len(overrides) == LAYERS * 6 + 1 and not any("embeddings" in k for k in overrides)  # LSQ + pooler, no table
    q = quantize_onnx_int8(fp32, tmp_path / "m.int8.onnx", overrides)
    _, _, x, _ = finalized
    with torch.no_grad():
        reference = SequenceClassifier(model).eval()(x)
    int8 = OrtClassifier(q)(x[:, 0], x[:, 1])
    assert (int8 - reference).abs().max() <= 0.05 * reference.abs().max()  # int8 tolerance as in test_deploy


def test_the_exported_pooler_is_a_plain_gemm_so_every_onnx_runtime_takes_its_axis(finalized, tmp_path):
    """ONNX Runtime before 1.32 turned a Gemm with transB=1 into a MatMul on a transposed copy under the
    weight's own name, and refused the pooler's per-channel override on axis 0 (reproduced with 1.30)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from jointcompress.hf.int8 import OrtClassifier, export_onnx, trained_overrides

    hf, spec, x, _ = finalized
    save_hf_artifact(hf, spec, tmp_path / "art", None, ptq_bits=8)  # the pooler gets a scale of its own
    model, _, loaded_spec = load_hf_artifact(tmp_path / "art", with_spec=True)
    path = export_onnx(model, tmp_path / "m.onnx", seq_len=12)
    graph = onnx.load(str(path)).graph
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert gemms and all(a.i == 0 for n in gemms for a in n.attribute if a.name == "transB")
    pooler = dict(model.named_modules())["bert.pooler.dense"].weight.detach().numpy()
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    name = next(k for k, v in stored.items() if v.shape == pooler.T.shape and np.array_equal(v, pooler.T))
    overrides = trained_overrides(path, model, loaded_spec)
    assert overrides[name][0]["axis"] == 1  # the output channels, where a MatMul's quantizer looks
    with torch.no_grad():
        reference = SequenceClassifier(model).eval()(x)
    assert torch.allclose(OrtClassifier(path)(x[:, 0], x[:, 1]), reference, atol=1e-4)  # the same product


def test_a_gemm_weight_the_graph_also_outputs_keeps_its_layout(tmp_path):
    """untranspose_gemm_weights counted only node inputs: a weight that is also a graph output came back
    transposed under its declared shape."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from jointcompress.hf.int8 import untranspose_gemm_weights

    w = np.arange(6, dtype=np.float32).reshape(3, 2)  # [out, in], used with transB=1
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 2])],
        [numpy_helper.from_array(w, "W")])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert untranspose_gemm_weights(path) == 0
    stored = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    assert np.array_equal(stored, w)
    single = helper.make_graph(graph.node, "g", graph.input, graph.output[:1], graph.initializer)  # W used once
    onnx.save(helper.make_model(single, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert untranspose_gemm_weights(path) == 1
    assert np.array_equal(numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]), w.T)


def test_a_token_classifier_is_saved_and_loaded_as_its_own_class_and_refused_once_its_units_are_removed(tmp_path):
    """The artifact was rebuilt as a sequence classifier whatever the model's head: a token classifier (no
    pooler) or a multiple-choice head failed at save with a shape mismatch naming a builder save_hf_artifact
    does not take. The class is recorded; heads or neurons removed from such a head are refused by name."""
    from transformers import BertConfig, BertForTokenClassification

    from jointcompress.hf.ffn import prune_ffn
    from jointcompress.spec import CompressionSpec

    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=64, num_labels=5)).eval()
    ids = torch.randint(5, 64, (3, 9))
    save_hf_artifact(model, CompressionSpec(), tmp_path / "tok", ptq_bits=None)
    loaded, _ = load_hf_artifact(tmp_path / "tok")
    assert type(loaded) is BertForTokenClassification
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    prune_ffn(model, [list(range(32)), list(range(32))])
    with pytest.raises(ArtifactError, match="BertForTokenClassification had heads or FFN neurons removed, and only "
                                            "sequence classifiers and .* causal LMs are rebuilt"):
        save_hf_artifact(model, CompressionSpec(), tmp_path / "pruned", ptq_bits=None)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_before_saving(tmp_path):
    """Another model's tokenizer (more tokens than the embedding has rows) was saved without a word, and the loaded
    model's first generate() failed deep in torch with "index out of range in self"; the command line refused it."""
    from transformers import BertTokenizerFast

    from hf_helpers import tiny_bert
    from jointcompress.hf.export import export_folder
    from jointcompress.spec import CompressionSpec

    vocab = tmp_path / "big.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]) + "\n")
    big = BertTokenizerFast(vocab=str(vocab))
    model = tiny_bert(layers=1)  # 64 rows
    for write in (lambda: save_hf_artifact(model, CompressionSpec(), tmp_path / "a", big),
                  lambda: export_folder(model, big, tmp_path / "f")):
        with pytest.raises(ArtifactError, match=r"the tokenizer has 100 tokens and the model's embedding table 64 rows"):
            write()
    assert not (tmp_path / "a").exists()
    save_hf_artifact(model, CompressionSpec(), tmp_path / "b", tiny_tokenizer(tmp_path))  # its own: saved

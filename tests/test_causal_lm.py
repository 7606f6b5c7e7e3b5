"""Causal LMs through the session: GPT-2 (Conv1D converted, tied LM head) and a Llama with
grouped-query attention, with the model's own next-token loss and token-level KD; finalize
keeps the logits, the packed artifact loads back to the same logits and generate() works."""
from __future__ import annotations

import copy
import warnings

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from hf_helpers import tiny_llama as llama  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import jointcompress  # noqa: E402
from jointcompress import RecipeError  # noqa: E402
from jointcompress.artifact import load, save  # noqa: E402
from jointcompress.hf.causal import arithmetic_rows as rows, conv1d_to_linear, perplexity, tied_weights  # noqa: E402

RECIPE = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5, "exclude": ["lm_head"]},
                         {"type": "quant_lsq", "bits": 4, "exclude": ["lm_head"]},
                         {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]}


def gpt2_raw():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=1, eos_token_id=2))


def gpt2():
    return conv1d_to_linear(gpt2_raw())


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def test_conv1d_to_linear_is_exact():
    raw = gpt2_raw().eval()
    lin = conv1d_to_linear(copy.deepcopy(raw))
    ids, mask = rows(4, 3)
    assert isinstance(lin.transformer.h[0].attn.c_attn, torch.nn.Linear)
    with torch.no_grad():
        assert torch.allclose(raw(input_ids=ids, attention_mask=mask).logits, lin(input_ids=ids, attention_mask=mask).logits,
                              atol=1e-5)


def test_a_gpt2_classifier_made_linear_is_said_at_conversion_and_refused_by_name_at_save(tmp_path):
    """GPT2ForSequenceClassification keeps its class (which builds Conv1D) after conv1d_to_linear: it trained and
    finalized, and then save_hf_artifact failed in a shape mismatch whose advice named FFN widths (nothing was
    pruned). Said at conversion, refused before writing, naming the class and the way out (ONNX)."""
    from transformers import GPT2ForSequenceClassification

    from jointcompress.spec import CompressionSpec
    from jointcompress.errors import ArtifactError
    from jointcompress.hf.artifact import save_hf_artifact

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                                     pad_token_id=0, num_labels=2))
    with pytest.warns(UserWarning, match=r"conv1d_to_linear: GPT2ForSequenceClassification keeps its transformers "
                                         r"class.*deploy it through ONNX"):
        conv1d_to_linear(model)
    with pytest.raises(ArtifactError, match=r"GPT2ForSequenceClassification's projections were converted to nn.Linear"):
        save_hf_artifact(model, CompressionSpec(layers={}), tmp_path / "a", None, ptq_bits=None)
    assert not (tmp_path / "a").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        conv1d_to_linear(gpt2_raw())  # the LM has its class: no word


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama_gqa"])
def test_causal_lm_compress_finalize_artifact_generate(build, tmp_path):
    teacher = build().eval()
    model = copy.deepcopy(teacher)
    ids, mask = rows(64, 0)
    labels = ids.masked_fill(mask == 0, -100)
    steps = 12
    session = jointcompress.prepare(model, RECIPE, total_steps=steps, teacher=teacher)
    opt = torch.optim.AdamW(session.param_groups(lr=3e-3))
    session.bind(opt)
    model.train()
    for s in range(steps):
        i = (s * 16) % 64
        batch = {"input_ids": ids[i:i + 16], "attention_mask": mask[i:i + 16], "labels": labels[i:i + 16]}
        terms = session.loss(model(**batch), batch)
        assert set(terms) == {"task", "distill"} and bool(terms["distill"] >= 0)
        opt.zero_grad()
        session.backward(terms)
        session.before_step()
        opt.step()
        session.after_step()
    assert abs(session.metrics()["prune_unstructured.sparsity"] - 0.5) < 0.01
    x, xm = rows(8, 1)
    model.eval()
    with torch.no_grad():
        masked = model(input_ids=x, attention_mask=xm).logits
    spec = session.finalize()
    assert len(spec.layers) == 2 * (4 if build is gpt2 else 7) and all(ls.bits == 4 for ls in spec.layers.values())
    with torch.no_grad():
        final = model(input_ids=x, attention_mask=xm).logits
    assert torch.allclose(masked, final, atol=1e-4)
    manifest = save(model, spec, tmp_path / "art", builder=build, example_inputs=x[:2])
    loaded = load(tmp_path / "art", build)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x, attention_mask=xm).logits, final, atol=1e-5)
    dense = sum(p.numel() * 4 for p in build().parameters())
    assert manifest["bytes"]["total"] < dense / 2
    prompt = x[:2, :5]
    out = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 11) and torch.equal(out, model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                                    max_new_tokens=6, do_sample=False))
    assert perplexity(loaded, x, xm) == pytest.approx(perplexity(model, x, xm))


def test_tied_lm_head_and_conv1d_are_refused_with_the_module_named():
    model = gpt2()
    assert tied_weights(model) == {"lm_head": "transformer.wte"}
    with pytest.raises(RecipeError, match=r"layer 'lm_head' shares its weight with 'transformer.wte'.*exclude"):
        jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, total_steps=4)
    with pytest.raises(RecipeError, match=r"'transformer.h.0.attn.c_attn' is a transformers Conv1D.*conv1d_to_linear"):
        jointcompress.prepare(gpt2_raw(), RECIPE, total_steps=4, teacher=gpt2_raw())
    # prune_ffn ended in "'Conv1D' object has no attribute 'out_features'"; with_ffn_widths in a shape mismatch
    with pytest.raises(RecipeError, match=r"prune_ffn: 'transformer.h.0.attn.c_attn' is a transformers Conv1D.*"
                                          r"conv1d_to_linear\(model\)"):
        jointcompress.prepare(gpt2_raw(), {"techniques": [{"type": "prune_ffn", "sparsity": 0.5}]}, total_steps=4)
    from jointcompress.errors import UnsupportedModelError
    from jointcompress.hf.causal import with_ffn_widths

    with pytest.raises(UnsupportedModelError, match=r"with_ffn_widths: build\(\) returned .*Conv1D.*return "
                                                    r"conv1d_to_linear\(model\) from build\(\)"):
        with_ffn_widths(gpt2_raw, [31, 33])()


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama_gqa"])
def test_causal_lm_ffn_neurons_removed_with_parity_and_artifact(build, tmp_path):
    from jointcompress.hf.causal import with_ffn_widths
    from jointcompress.hf.ffn import ffn_widths

    teacher = build().eval()
    model = copy.deepcopy(teacher)
    full = ffn_widths(model)
    recipe = {"techniques": [{"type": "prune_ffn", "sparsity": 0.5, "end": 0.5},
                             {"type": "quant_lsq", "bits": 4, "exclude": ["lm_head"]},
                             {"type": "distill_kd", "alpha": 0.5}]}
    ids, mask = rows(32, 0)
    session = jointcompress.prepare(model, recipe, total_steps=8, teacher=teacher)
    opt = torch.optim.AdamW(session.param_groups(lr=3e-3))
    session.bind(opt)
    model.train()
    for s in range(8):
        i = (s * 8) % 32
        batch = {"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8], "labels": ids[i:i + 8].masked_fill(mask[i:i + 8] == 0, -100)}
        terms = session.loss(model(**batch), batch)
        opt.zero_grad()
        session.backward(terms)
        session.before_step()
        opt.step()
        session.after_step()
    x, xm = rows(8, 1)
    model.eval()
    with torch.no_grad():
        masked = model(input_ids=x, attention_mask=xm).logits
    spec = session.finalize()
    widths = ffn_widths(model)
    assert sum(widths) == sum(full) // 2 and model.config.intermediate_per_layer == widths
    if build is llama:  # gated MLP: gate rows removed with the up rows
        assert [layer.mlp.gate_proj.out_features for layer in model.model.layers] == widths
    with torch.no_grad():
        final = model(input_ids=x, attention_mask=xm).logits
    assert torch.allclose(masked, final, atol=1e-4)
    builder = with_ffn_widths(build, widths)
    save(model, spec, tmp_path / "art", builder=builder, example_inputs=x[:2])
    loaded = load(tmp_path / "art", builder)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x, attention_mask=xm).logits, final, atol=1e-5)
    prompt = x[:1, :5]
    assert loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False).shape == (1, 9)
    from transformers import AutoModelForCausalLM

    from jointcompress.hf.artifact import load_hf_artifact, save_hf_artifact

    model.save_pretrained(tmp_path / "hf")  # the stock class built full widths: the folder did not load
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    save_hf_artifact(model, spec, tmp_path / "hf_art", ptq_bits=None)  # refused: "only sequence classifiers"
    packed, _ = load_hf_artifact(tmp_path / "hf_art")
    with torch.no_grad():
        for rebuilt in (again, packed):
            assert ffn_widths(rebuilt) == widths
            assert torch.allclose(rebuilt(input_ids=x, attention_mask=xm).logits, final, atol=1e-5)
    fp32_rest = (tmp_path / "hf_art" / "weights.jcw").stat().st_size
    manifest = save_hf_artifact(model, spec, tmp_path / "hf_art8", ptq_bits=8)  # the embedding (GPT-2's tied to lm_head)
    rounded, _ = load_hf_artifact(tmp_path / "hf_art8")  # rounded per row in place, and stored so
    assert manifest["weights_file_bytes"] < fp32_rest
    for alias, source in tied_weights(model).items():  # GPT-2's lm_head: stored once, as its embedding's alias
        assert alias not in manifest["layers"] and manifest["aliases"][f"{alias}.weight"] == f"{source}.weight"
    with torch.no_grad():
        assert torch.equal(rounded(input_ids=x, attention_mask=xm).logits, model(input_ids=x, attention_mask=xm).logits)


@pytest.mark.parametrize("kind", ["prune_heads", "prune_layers"])
def test_causal_lm_heads_and_layers_are_refused_naming_the_model_type(kind):
    with pytest.raises(RecipeError, match=rf"{kind}: .* not supported for model_type 'llama' \(supported: ffn\)"):
        jointcompress.prepare(llama(), {"techniques": [{"type": kind, "sparsity": 0.5}]}, total_steps=4)


def test_unit_pruning_of_a_causal_lm_type_it_does_not_know_points_at_what_applies():
    """Phi was told to use prune_structured for a vision model; a causal LM is told what applies to it."""
    from transformers import PhiConfig, PhiForCausalLM

    phi = PhiForCausalLM(PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=32))
    with pytest.raises(RecipeError, match=r"got PhiForCausalLM .*For a causal LM of another type, prune_unstructured "
                                          r"and quant_lsq apply") as err:
        jointcompress.prepare(phi, {"techniques": [{"type": "prune_ffn", "sparsity": 0.5}]}, total_steps=4)
    assert "vision" not in str(err.value)


@pytest.mark.parametrize("build", [gpt2, llama, qwen2], ids=["gpt2", "llama_gqa", "qwen2"])
def test_a_causal_lm_with_ffn_neurons_removed_loads_from_its_folder_without_jointcompress(build, tmp_path):
    """The finalized model kept the stock class, which builds every MLP at the config's width: save_pretrained
    and export_folder wrote folders that transformers could not load (a shape mismatch), without a word; and a
    converted GPT-2's Linear weights were read as Conv1D ones. Qwen2 (the same gated MLP) was refused."""
    from hf_helpers import logits_without_jointcompress, tiny_tokenizer

    from jointcompress.hf.export import export_folder
    from jointcompress.hf.ffn import ffn_widths, prune_ffn

    model = build().eval()
    full = ffn_widths(model)[0]
    prune_ffn(model, [list(range(0, full, 2)), list(range(3, full // 3))])
    assert ffn_widths(model) == [full // 2, full // 3 - 3]
    x, xm = rows(4, 1)
    with torch.no_grad():
        expected = model(input_ids=x, attention_mask=xm).logits
    out = export_folder(model, tiny_tokenizer(tmp_path), tmp_path / "out")
    got = logits_without_jointcompress(out, "AutoModelForCausalLM", {"input_ids": x, "attention_mask": xm}, tmp_path)
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_command_line_refuses_a_causal_lm_before_loading_it(tmp_path):
    """A Llama folder given to `jointcompress compress` with an hf: section was loaded as a sequence classifier with
    a new random head (transformers' report of a missing score.weight), then refused as a "classifier"."""
    from jointcompress.errors import UnsupportedModelError
    from jointcompress.hf import recipe_steps

    llama().save_pretrained(tmp_path / "lm")
    with pytest.raises(UnsupportedModelError, match=r"a causal language model \(LlamaForCausalLM\).*from Python"):
        recipe_steps.refuse_causal_lm(str(tmp_path / "lm"))
    recipe_steps.refuse_causal_lm(str(tmp_path / "no-such-folder"))  # unreadable: loading the model says why


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama_gqa"])
def test_perplexity_of_a_left_padded_row_is_that_of_the_row_right_padded(build):
    """Positions were numbered from the row's first slot, padding included, and the first real token was scored
    as read from a pad: the same rows read worse left-padded than right-padded."""
    model = build().eval()
    ids, mask = rows(8, 2)
    real = mask.sum(1)
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for r, n in enumerate(real.tolist()):
        left_ids[r, ids.shape[1] - n:], left_mask[r, ids.shape[1] - n:] = ids[r, :n], 1
    assert not torch.equal(left_mask, mask)  # rows of arithmetic_rows are padded on the right
    assert perplexity(model, left_ids, left_mask) == pytest.approx(perplexity(model, ids, mask), rel=1e-5)


def test_a_causal_lm_exports_to_onnx_with_its_cache_left_out(tmp_path):
    """The exported copy kept use_cache: its DynamicCache output stopped both exporters, and the message did not say
    to turn it off. The user's model keeps its cache for generate()."""
    from jointcompress.deploy.onnx_export import export_and_check

    model = llama().eval()
    ids, _ = rows(4, 1)
    report = export_and_check(model, tmp_path / "lm.onnx", ids[:2], eval_data=ids)
    assert report.max_abs_logit_diff < 1e-4 and report.samples == 4
    assert model.config.use_cache


def _padded_lm_rows(n: int = 16, short: int = 4) -> list[dict]:
    """n rows of 16 tokens, the first half with only `short` real ones (right padding, labels -100 there)."""
    ids, _ = rows(n, 0)
    ids = ids[:, :16]
    mask = torch.ones_like(ids)
    mask[: n // 2, short:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i].masked_fill(mask[i] == 0, -100)}
            for i in range(n)]


@pytest.mark.parametrize("build, kd", [("llama", False), ("llama", True), ("gpt2", False)])
def test_micro_batches_of_padded_lm_rows_take_the_update_of_one_batch(build, kd):
    """Each part was weighted by its share of the samples, while the model's loss averages over real tokens: two
    parts, one of short rows and one of long, took an update 66% of its norm away from one batch's. Then the parts
    were weighted by shifted labels for every term, while a token-level distillation averages over the attention
    mask (one more position a row): 9% away with distillation alone; and GPT-2's LM head, whose loss_type
    transformers leaves unset, was read as a model that does not shift: 20% away."""
    data = _padded_lm_rows(short=2)
    base = (llama if build == "llama" else gpt2)()
    for m in base.modules():  # GPT-2's dropout would draw other masks for other parts
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    teacher = copy.deepcopy(base).eval()
    with torch.no_grad():
        for p in teacher.parameters():  # a teacher the student differs from, so that distillation has a gradient
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))

    def update(parts: int) -> torch.Tensor:
        model = copy.deepcopy(base)
        recipe = {"techniques": [{"type": "distill_kd", "alpha": 1.0, "temperature": 2.0}] if kd else [],
                  "training": {"epochs": 1, "lr": 1.0, "batch_size": 16, "optimizer": "sgd", "weight_decay": 0.0,
                               "micro_batches": parts}}
        loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            jointcompress.compress(model, recipe, loader, lambda m: {"accuracy": 0.0}, distributed=False,
                                   teacher=teacher if kd else None)
        moved = [(p - q).flatten() for p, q in zip(model.parameters(), base.parameters())]
        return torch.cat(moved).detach()

    whole, halves = update(1), update(2)
    assert whole.norm() > 0 and (whole - halves).norm() / whole.norm() < 1e-5


def test_the_packed_artifact_keeps_the_generation_settings(tmp_path):
    """The packed artifact stored the model's config only: loaded, the model generated past the EOS ids and to the
    length its generation_config set (save_pretrained's folder keeps them in generation_config.json)."""
    from jointcompress.hf.artifact import load_hf_artifact, save_hf_artifact

    model = llama().eval()
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 8, "exclude": ["lm_head"]}]},
                                    total_steps=1)
    spec = session.finalize()
    prompt = torch.tensor([[5, 9, 13, 17]])
    free = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)[0, 4:]
    stop = next(i for i in range(1, len(free)) if int(free[i]) not in free[:i].tolist() + [2])
    model.generation_config.eos_token_id = [2, int(free[stop])]  # stop at a token it generates after the first
    model.generation_config.max_new_tokens, model.generation_config.do_sample = 6, False
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt))
    assert expected.shape[1] == 4 + stop + 1 < 4 + 6
    save_hf_artifact(copy.deepcopy(model), spec, tmp_path / "art", None, ptq_bits=None)
    loaded, _ = load_hf_artifact(tmp_path / "art")
    assert loaded.generation_config.eos_token_id == [2, int(free[stop])]
    assert loaded.generation_config.max_new_tokens == 6
    assert torch.equal(loaded.generate(prompt, attention_mask=torch.ones_like(prompt)), expected)


def test_distillation_of_a_dict_batch_without_attention_mask_leaves_out_the_positions_labelled_minus_100():
    """A dict batch marking its padding in the labels only (no attention_mask) was distilled over every position, so
    the loss read the pad ids (3.879 with one pad id, 3.793 with another); a tuple batch already left them out."""
    student, teacher = llama(), llama()
    with torch.no_grad():
        teacher.lm_head.weight.add_(0.1)  # a teacher that differs from the student
    ids, _ = rows(4, 0)
    ids = ids[:, :12]
    labels = ids.clone()
    labels[:2, 6:] = -100  # two rows padded after 6 tokens
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd"}]}, total_steps=2, teacher=teacher)
    losses = []
    for pad in (0, 7):
        padded = ids.masked_fill(labels == -100, pad)
        batch = {"input_ids": padded, "labels": labels}
        with torch.no_grad():
            losses.append(float(session.loss(student(input_ids=padded), batch)["distill"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_structured_pruning_of_a_causal_lm_returning_its_cache_names_use_cache():
    """The trace failed on the cache of keys and values the model returns ('tuple' object has no attribute 'grad_fn')
    and the error never said that the same model traces with config.use_cache off."""
    from jointcompress.errors import UnsupportedModelError

    ids = torch.randint(3, 60, (2, 8))
    recipe = {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "targets": ["*mlp*"]}]}
    model = llama()
    with pytest.raises(UnsupportedModelError, match=r"config.use_cache.*set model.config.use_cache = "
                                                     r"False before prepare"):
        jointcompress.prepare(model, recipe, total_steps=4, example_inputs={"input_ids": ids})
    model.config.use_cache = False
    session = jointcompress.prepare(model, recipe, total_steps=4, example_inputs={"input_ids": ids})
    assert len(next(t for t in session.techniques if t.kind == "prune_structured").groups) == 2


def test_labels_that_count_the_padding_are_said_once():
    """Dict batches with labels = input_ids, padding left in: the model's own loss counted the pad positions (it learnt
    that padding follows padding), while distillation averaged over the attention mask, without a word."""
    model = llama()
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 8}]}, total_steps=2)
    rows = _padded_lm_rows(4, short=3)
    ids = torch.stack([r["input_ids"] for r in rows])
    mask = torch.stack([r["attention_mask"] for r in rows])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for labels in (ids, ids):
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            session.loss(model(**batch), batch)
    padded = [w for w in said if "labels are not -100 where its attention_mask is 0" in str(w.message)]
    assert len(padded) == 1
    model = llama()
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 8}]}, total_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        session.loss(model(**batch), batch)


def test_a_builder_that_forgot_conv1d_to_linear_is_told_so(tmp_path):
    """A compressed GPT-2 (converted with conv1d_to_linear) saved with a builder of the stock model: the error read
    the Conv1D's [in, out] weights as FFN widths and advised with_ffn_widths(build, [128, 128]), a second error."""
    from jointcompress.artifact import save
    from jointcompress.errors import ArtifactError

    model = gpt2()
    ids, _ = rows(16, 0)
    data = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids[:, :12]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = jointcompress.compress(model, {"techniques": [{"type": "quant_lsq", "bits": 4, "exclude": ["lm_head"]}],
                                                "training": {"epochs": 1, "batch_size": 16}},
                                        torch.utils.data.DataLoader(data, batch_size=16), lambda m: 0.0,
                                        distributed=False)
    spec = result.finalize()
    with pytest.raises(ArtifactError, match=r"Conv1D projections \(transformer.h.0.attn.c_attn.*conv1d_to_linear\(model\)"):
        save(model, spec, tmp_path / "a", builder=gpt2_raw, example_inputs=ids[:2, :12])
    save(model, spec, tmp_path / "b", builder=gpt2, example_inputs=ids[:2, :12])  # the converted builder fits

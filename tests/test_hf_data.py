"""Text-classification files (TSV, CSV, JSON lines) read and tokenized; the classes a teacher names;
remote-code loading of pruned folders."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from hf_helpers import inputs, logits_without_jointcompress, tiny_bert, tiny_tokenizer  # noqa: E402

from jointcompress.errors import DataError  # noqa: E402
from jointcompress.hf.data import batches, read_rows, read_tsv, tokenize  # noqa: E402
from jointcompress.hf.export import export_folder  # noqa: E402
from jointcompress.hf.heads import prune_heads  # noqa: E402
from jointcompress.hf.layers import drop_layers, every_other  # noqa: E402


def test_read_tsv_and_tokenize(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text("sentence\tlabel\ngood movie \t1\nawful plot\t0\n\nthe\tacting\tis fun\t1\n")
    d = read_tsv(f)
    assert d.labels == [1, 0, 1] and d.sentences[0] == "good movie" and d.sentences[2] == "the\tacting\tis fun"
    t = tokenize(tiny_tokenizer(tmp_path), d, max_length=64)
    assert t["input_ids"].shape == (3, 64) and t["labels"].tolist() == [1, 0, 1]
    (b,) = list(batches(t, 8))
    assert b["input_ids"].shape[1] == int(t["attention_mask"].sum(1).max())
    rows = sorted(int(i) for bb in batches(t, 2, shuffle=True, bucket=2) for i in bb["labels"])
    assert rows == [0, 1, 1]


@pytest.mark.parametrize("text,match", [
    ("sentence\tlabel\nok\tx\n", "not an integer"),
    ("text,label\nok,1\n", "header"),
    ("sentence\tlabel\nno tab here\n", "no tab"),
])
def test_read_tsv_errors_name_the_line(tmp_path, text, match):
    f = tmp_path / "bad.tsv"
    f.write_text(text)
    with pytest.raises(DataError, match=match):
        read_tsv(f)


def test_rows_come_from_csv_and_json_lines_with_named_labels_and_other_columns(tmp_path):
    names = ["negative", "neutral", "positive"]
    csv_file = tmp_path / "train.csv"  # a spreadsheet's byte-order mark, quoting, an index column
    csv_file.write_text('\ufeffidx,text,label\n0,"good, fun movie",positive\n1,"the ""plot""",1\n2,awful,negative\n',
                        encoding="utf-8")
    d = read_rows(csv_file, label_names=names)
    assert d.sentences == ["good, fun movie", 'the "plot"', "awful"] and d.labels == [2, 1, 0]
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text('{"review": "great film", "stars": 2}\n\n{"review": "boring", "stars": "neutral"}\n'
                     '{"review": "ok", "stars": false}\n')
    d = read_rows(jsonl, text_column="review", label_column="stars", label_names=names)
    assert d.sentences == ["great film", "boring", "ok"] and d.labels == [2, 1, 0]


@pytest.mark.parametrize("name,text,kwargs,match", [
    ("t.csv", "a,b,label\nx,y,0\n", {"pair_column": "b"}, "hf.pair_column is 'b' but hf.text_column is not set"),
    ("t.csv", "a,b,label\nx,y,0\n", {"text_column": "a", "pair_column": "c"}, "no 'c' column \\(hf.pair_column\\)"),
    ("t.csv", "text,y\nok,1\n", {}, "no 'label' column.*hf.label_column"),
    ("t.csv", "body,label\nok,1\n", {}, "text column.*hf.text_column"),
    ("t.csv", "text,label\nok,maybe\n", {"label_names": ["no", "yes"]},
     "t.csv:2: label 'maybe' is none of the classes \\['no', 'yes'\\].*drop those rows"),
    ("t.jsonl", '{"text": null, "label": 0}\n', {}, "t.jsonl:1: 'text' is null in this row"),  # trained as "None"
    ("t.jsonl", '{"text": "ok", "label": 0.5}\n', {}, "t.jsonl:1: label 0.5 is not an integer"),
    ("t.jsonl", "[1, 2]\n", {}, "a JSON object per line"),
    ("t.txt", "text,label\n", {}, "unknown format"),
    ("t.tsv", "label\tsentence\n1\ta\tb\n", {}, "t.tsv:2: 3 field\\(s\\) where the header has 2"),  # text not first
])
def test_text_files_that_cannot_be_read_say_which_column_or_row(tmp_path, name, text, kwargs, match):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(DataError, match=match):
        read_rows(f, **kwargs)


def test_a_file_without_a_header_is_read_with_the_columns_named(tmp_path):
    f = tmp_path / "train.tsv"  # GLUE's CoLA: source, label, the author's mark (often empty), sentence
    f.write_text("gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n")
    with pytest.raises(DataError, match="no 'label' column.*hf.columns"):  # its first row is no header
        read_rows(f)
    d = read_rows(f, columns=["source", "label", "mark", "sentence"])
    assert d.sentences == ["Our friends won't buy this analysis.", "They drank the pub."] and d.labels == [1, 0]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "ok", "label": 0}\n')
    with pytest.raises(DataError, match="remove hf.columns"):
        read_rows(jsonl, columns=["text", "label"])
    with pytest.raises(DataError, match="given twice"):
        read_rows(f, columns=["a", "label", "a", "sentence"])
    # the messages name hf.columns, not a header the file does not have
    with pytest.raises(DataError, match=r"4 field\(s\) where hf.columns names 3 .*one name per field"):
        read_rows(f, columns=["source", "label", "sentence"])
    with pytest.raises(DataError, match="hf.columns is .* no 'label' column.*hf.label_column"):
        read_rows(f, columns=["source", "y", "mark", "sentence"])
    headed = tmp_path / "dev.tsv"
    headed.write_text("sentence\tlabel\na fine film .\t1\n")
    with pytest.raises(DataError, match="has a header row, so remove hf.columns"):
        read_rows(headed, columns=["sentence", "label"])


def test_sentence_pairs_are_read_tokenized_as_two_segments_and_reach_the_model_with_their_token_types(tmp_path):
    from jointcompress.hf.wrapper import SequenceClassifier, pack_tokens

    f = tmp_path / "dev.csv"  # QNLI's columns: the pair, not 'sentence' alone
    f.write_text("idx,question,sentence,label\n0,is the plot good,the plot is fun,1\n1,was it boring,a great film,0\n")
    d = read_rows(f)
    assert d.sentences == ["is the plot good", "was it boring"] and d.pairs == ["the plot is fun", "a great film"]
    assert read_rows(f, text_column="sentence").pairs is None  # one column named: one text
    assert d.subset(1, seed=0).pairs is not None and d.head(1).pairs == ["the plot is fun"]
    t = tokenize(tiny_tokenizer(tmp_path), d, max_length=16)
    assert t["token_type_ids"].sum() > 0  # the second segment is type 1
    x = pack_tokens(t)
    assert x.shape == (2, 3, 16)
    assert pack_tokens(tokenize(tiny_tokenizer(tmp_path), read_rows(f, text_column="sentence"), 16)).shape == (2, 2, 16)
    model = tiny_bert()
    with torch.no_grad():
        wrapped = SequenceClassifier(model, trim=False)(x)
        direct = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], token_type_ids=t["token_type_ids"]).logits
        one_segment = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    assert torch.equal(wrapped, direct) and not torch.allclose(wrapped, one_segment)
    assert torch.allclose(SequenceClassifier(model)(x), direct, atol=1e-5)  # trimmed to the longest row


def test_split_files_take_datasets_names_and_refuse_two_candidates(tmp_path):
    from jointcompress.hf.recipe_steps import split_files

    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "validation.csv").write_text("")
    assert split_files(tmp_path) == (tmp_path / "train.jsonl", tmp_path / "validation.csv")
    (tmp_path / "dev.tsv").write_text("")
    with pytest.raises(DataError, match="dev.tsv and validation.csv: one only"):
        split_files(tmp_path)
    with pytest.raises(DataError, match="train.jsonl: a file; an hf: recipe reads a folder"):
        split_files(tmp_path / "train.jsonl")


def _hf_run(tmp_path, teacher, rows: str):
    """A CLI run (recipe_steps.HFRun) with `teacher` and the tiny tokenizer saved as its teacher folder and loaded,
    and a data folder whose train and dev files hold `rows` (TSV with a header)."""
    from jointcompress.hf import recipe_steps as steps
    from jointcompress.recipe import parse_recipe

    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer(tmp_path).save_pretrained(tmp_path / "teacher")
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"{split}.tsv").write_text(rows)
    recipe = parse_recipe({"hf": {"student_layers": [0]}, "techniques": [{"type": "distill_kd"}]})
    run = steps.HFRun(recipe=recipe, hf_cfg=recipe.hf, out=tmp_path / "out", log=lambda _: None)
    steps.load_models(run, str(tmp_path / "teacher"))
    return run, data


def test_the_classes_come_from_the_teacher_and_a_count_that_disagrees_is_refused(tmp_path):
    """A 3-class teacher trained through the CLI path failed with transformers' size-mismatch traceback:
    the recipe's default named two classes."""
    from transformers import BertConfig, BertForSequenceClassification

    from jointcompress.errors import RecipeError
    from jointcompress.hf import recipe_steps as steps
    from jointcompress.recipe import parse_recipe

    names = {0: "entailment", 1: "neutral", 2: "contradiction"}
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=3, id2label=names, label2id={v: k for k, v in names.items()})
    run, data = _hf_run(tmp_path, BertForSequenceClassification(cfg),
                        "sentence\tlabel\ngood movie\tcontradiction\nawful\t0\nthe plot\t1\n")
    steps.load_text(run, data)
    assert run.labels == ["entailment", "neutral", "contradiction"] and run.train_data.labels == [2, 0, 1]
    assert run.student.config.num_labels == 3 and run.teacher.classifier.out_features == 3
    assert not run.warnings  # every class has a row
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "train.tsv").write_text("sentence\tlabel\ngood movie\t0\n")
    (mixed / "dev.csv").write_text("premise,hypothesis,label\ngood,movie,0\n")
    with pytest.raises(DataError, match="one holds sentence pairs, the other single texts"):
        steps.load_text(run, mixed)
    cola = tmp_path / "cola"  # no header row: the recipe's hf.columns name the columns
    cola.mkdir()
    for split in ("train", "dev"):
        (cola / f"{split}.tsv").write_text("gj04\t1\t\tgood movie\ngj04\t0\t*\tmovie the good\n")
    headerless = parse_recipe({"hf": {"columns": ["source", "label", "mark", "sentence"]},
                               "techniques": [{"type": "distill_kd"}]})
    cola_run = steps.HFRun(recipe=headerless, hf_cfg=headerless.hf, out=tmp_path / "o", log=lambda _: None,
                           labels=run.labels, tok=run.tok)
    steps.load_text(cola_run, cola)
    assert cola_run.dev_data.sentences == ["good movie", "movie the good"] and cola_run.y_dev.tolist() == [1, 0]
    # 2-way rows under the 3-way head: said, naming the class no training row has
    assert len(cola_run.warnings) == 1 and "label 2 of the classifier's 3 classes" in cola_run.warnings[0], cola_run.warnings
    assert "none is ['contradiction']" in cola_run.warnings[0]
    limited = parse_recipe({"hf": {"train_limit": 1}, "techniques": [{"type": "distill_kd"}]})  # the rows drawn count
    limited_run = steps.HFRun(recipe=limited, hf_cfg=limited.hf, out=tmp_path / "o2", log=lambda _: None,
                              labels=run.labels, tok=run.tok)
    steps.load_text(limited_run, data)
    assert len(limited_run.warnings) == 1 and "drawn from train.tsv (hf.train_limit: 1)" in limited_run.warnings[0]
    from transformers import AlbertConfig, GPT2Config

    from jointcompress.errors import UnsupportedModelError
    for config in (AlbertConfig(), GPT2Config()):  # a ValueError deep in pruning; an export refused after the run
        with pytest.raises(UnsupportedModelError, match=f"model_type '{config.model_type}'.*distilbert, electra, roberta only"):
            steps.check_family(config, "teacher-folder")
    from transformers import BartConfig, T5Config

    for config, kind in ((BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, vocab_size=50, num_labels=2,
                                     architectures=["BartForSequenceClassification"]), "Classifiers"),
                         (T5Config(d_model=16, num_layers=1, vocab_size=50, architectures=["T5ForConditionalGeneration"]),
                          r"Models \(T5ForConditionalGeneration\)")):
        folder = tmp_path / config.model_type  # its config only: refused before the weights or tokenizer are read
        config.save_pretrained(folder)         # (a BART classifier's weights failed to load, a long traceback)
        plain = parse_recipe({"techniques": [{"type": "distill_kd"}]})
        other = steps.HFRun(recipe=plain, hf_cfg=plain.hf, out=tmp_path / "o3", log=lambda _: None)
        with pytest.raises(UnsupportedModelError, match=f"model_type '{config.model_type}'.* only. {kind} of model_type"):
            steps.load_models(other, str(folder))
    two = parse_recipe({"hf": {"labels": ["NEGATIVE", "POSITIVE"]}, "techniques": [{"type": "distill_kd"}]})
    run = steps.HFRun(recipe=two, hf_cfg=two.hf, out=tmp_path / "out", log=lambda _: None)
    with pytest.raises(RecipeError, match="hf.labels names 2 classes.*has 3 outputs.*remove hf.labels"):
        steps.load_models(run, str(tmp_path / "teacher"))


def test_drop_layers_and_every_other():
    model = tiny_bert(layers=6)
    assert every_other(6, 3) == [1, 3, 5] and every_other(6, 6) == list(range(6))
    drop_layers(model, [0, 5])
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2
    model(**inputs())


@pytest.mark.parametrize("how", ["export_folder", "save_pretrained"])
def test_pruned_folder_loads_with_trust_remote_code_without_jointcompress(tmp_path, how):
    """A plain model.save_pretrained() of the pruned class wrote no modeling_pruned.py and no auto_map: the folder
    did not load without jointcompress, where export_folder's did."""
    model = tiny_bert()
    prune_heads(model, [[0], [1, 2], [3], [0, 1]])
    if how == "export_folder":
        out = export_folder(model, tiny_tokenizer(tmp_path), tmp_path / "out")
    else:
        out = tmp_path / "out"
        model.save_pretrained(out)
    x = inputs()
    with torch.no_grad():
        expected = model(**x).logits
    assert torch.equal(logits_without_jointcompress(out, "AutoModelForSequenceClassification", x, tmp_path), expected)


def test_save_pretrained_pushes_the_folder_with_its_code(tmp_path, monkeypatch):
    """save_pretrained(push_to_hub=True) uploaded what transformers had saved before the remote code and the auto_map
    were written: the Hub copy did not load. The upload (faked here: no Hub) now holds a folder that loads
    without jointcompress, and the local folder is written as before."""
    import shutil
    import types

    import transformers.utils.hub as hub

    uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(hub, "hf_api", lambda: types.SimpleNamespace(
        create_repo=lambda repo_id, **kw: types.SimpleNamespace(repo_id=f"me/{repo_id}")))
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **kw: types.SimpleNamespace(save=lambda path: None))
    pushed = []
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files",
                        lambda self, folder, repo_id, **kw: (pushed.append(repo_id), shutil.copytree(folder, uploaded)))
    model = tiny_bert()
    prune_heads(model, [[0], [1, 2], [3], [0, 1]])
    model.save_pretrained(tmp_path / "pruned", push_to_hub=True)
    x = inputs()
    with torch.no_grad():
        expected = model(**x).logits
    assert pushed == ["me/pruned"]
    for folder in (uploaded, tmp_path / "pruned"):
        assert torch.equal(logits_without_jointcompress(folder, "AutoModelForSequenceClassification", x, tmp_path),
                           expected)


def test_vocab_trim_is_lossless_on_its_text(tmp_path):
    from jointcompress.hf.vocab import trim_vocab

    tok = tiny_tokenizer(tmp_path)
    model = tiny_bert()
    texts = ["good movie", "the plot was boring", "fun acting"]
    before_enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(input_ids=before_enc["input_ids"], attention_mask=before_enc["attention_mask"]).logits
    model, new_tok, keep = trim_vocab(model, tok, texts, extra_ascii=False)
    assert len(keep) < 21 and model.config.vocab_size == len(keep)
    assert model.get_input_embeddings().weight.shape[0] == len(keep)
    enc = new_tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        after = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(after, before)
    assert new_tok.convert_ids_to_tokens(new_tok("awful")["input_ids"]) == ["[CLS]", "[UNK]", "[SEP]"]


def test_predict_logits_keeps_row_order(tmp_path):
    from jointcompress.hf.evaluate import predict_logits

    tok = tiny_tokenizer(tmp_path)
    texts = ["good", "the plot was boring and the acting was awful", "fun", "a great film"]
    t = tokenize(tok, __import__("jointcompress.hf.data", fromlist=["TextDataset"]).TextDataset(texts, [1, 0, 1, 1]))
    model = tiny_bert()
    got = predict_logits(model, t, batch_size=2)
    with torch.no_grad():
        ref = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_a_half_precision_checkpoint_loads_as_float32(tmp_path):
    """transformers loads a checkpoint in the dtype it was saved in; the techniques train float32
    weights and refuse others, which a CLI user could not fix: the loader asks for float32."""
    from hf_helpers import tiny_bert

    from jointcompress.hf.load import load_classifier

    model = tiny_bert(layers=1).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = load_classifier(str(tmp_path))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.classifier.weight, model.classifier.weight.float())


def test_a_vocabulary_trim_that_costs_accuracy_is_among_the_runs_notes():
    """From 320 training rows (hf.train_limit) the trim kept 1,620 of 30,522 word pieces and dev accuracy fell 10.5
    points, written to the log only."""
    from types import SimpleNamespace

    from jointcompress.hf.recipe_steps import _say_trim_cost

    logged = []
    run = SimpleNamespace(measured={"final_acc": 0.64}, warnings=[], log=logged.append,
                          hf_cfg=SimpleNamespace(train_limit=320), train_data=SimpleNamespace(texts=["a"] * 320))
    _say_trim_cost(run, 0.745, 1620, 30522)
    assert len(run.warnings) == 1 and run.warnings == logged
    assert "trim_vocab cost 10.5 points" in run.warnings[0] and "320 training rows (hf.train_limit)" in run.warnings[0]
    run.warnings.clear()
    run.measured["final_acc"] = 0.74  # half a point: the documented cost of a trim from the whole training set
    _say_trim_cost(run, 0.745, 1620, 30522)
    assert run.warnings == []


def test_hf_labels_in_another_order_than_the_teachers_are_refused(tmp_path):
    """hf.labels naming the teacher's classes in another order renamed its outputs by position: every class read
    as another, dev accuracy near zero, and the exported config's id2label wrong, without a word."""
    from transformers import BertConfig, BertForSequenceClassification

    from jointcompress.errors import RecipeError
    from jointcompress.hf import recipe_steps as steps
    from jointcompress.recipe import parse_recipe

    names = {0: "tiny", 1: "short", 2: "long"}
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=3, id2label=names, label2id={v: k for k, v in names.items()})
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "teacher")
    hf = parse_recipe({"hf": {"labels": ["long", "short", "tiny"]}, "techniques": [{"type": "distill_kd"}]}).hf
    with pytest.raises(RecipeError, match=r"names the teacher's classes in another order .*\['tiny', 'short', 'long'\]"):
        steps.class_names(hf, str(tmp_path / "teacher"))
    same = parse_recipe({"hf": {"labels": ["tiny", "short", "long"]}, "techniques": [{"type": "distill_kd"}]}).hf
    assert steps.class_names(same, str(tmp_path / "teacher")) == ["tiny", "short", "long"]


def test_a_teacher_under_chance_on_the_dev_rows_is_said(tmp_path):
    """A teacher read at 0% (the label column given as the text, classes in another order) was distilled without a
    word; a base encoder's new head is not blamed for its chance readings."""
    from transformers import BertForSequenceClassification

    from jointcompress.hf import recipe_steps as steps
    from jointcompress.recipe import parse_recipe

    from transformers import BertConfig, BertModel

    names = {0: "a", 1: "b", 2: "c", 3: "d"}
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=4, id2label=names, label2id={v: k for k, v in names.items()})
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "trained")
    BertModel(cfg).save_pretrained(tmp_path / "base")  # a base encoder: its head is new, untrained
    recipe = parse_recipe({"techniques": [{"type": "distill_kd"}]})
    run = steps.HFRun(recipe=recipe, hf_cfg=recipe.hf, out=tmp_path, log=lambda _: None, labels=list(names.values()))
    for src, accuracy, said in (("trained", 0.10, 1), ("trained", 0.20, 0), ("base", 0.10, 0)):
        run.src, run.teacher_acc, run.warnings = str(tmp_path / src), accuracy, []
        steps._warn_under_chance(run)
        assert len([w for w in run.warnings if "under half of chance (25% for 4 classes)" in w]) == said, src


def test_pairs_for_a_teacher_of_one_token_type_carry_no_token_types_and_tokenizers_are_saved_at_the_models_length(tmp_path):
    """A RoBERTa teacher (type_vocab_size 1) given sentence pairs through a WordPiece tokenizer failed with an
    IndexError in its token-type embedding; the saved tokenizers kept the teacher's model_max_length (512) beside
    models of 64 positions, so pipeline(truncation=True) and padding='max_length' made rows the models refused."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from jointcompress.hf import recipe_steps as steps
    from jointcompress.hf.data import TextDataset
    from jointcompress.hf.pipeline import _tokenizer_up_to
    from jointcompress.recipe import parse_recipe

    tok = tiny_tokenizer(tmp_path)
    recipe = parse_recipe({"hf": {"max_length": 16}, "techniques": [{"type": "distill_kd"}]})
    pairs = TextDataset(["good movie", "awful"], [1, 0], ["the plot", "fun acting"])
    for types, kept in ((1, False), (2, True)):
        run = steps.HFRun(recipe=recipe, hf_cfg=recipe.hf, out=tmp_path, log=lambda _: None, tok=tok,
                          teacher=SimpleNamespace(config=SimpleNamespace(type_vocab_size=types)))
        assert ("token_type_ids" in steps._tokens(run, pairs)) is kept
    tok.model_max_length = 512
    with _tokenizer_up_to(tok, 16) as limited:
        limited.save_pretrained(tmp_path / "saved")
    assert tok.model_max_length == 512  # the run's own is given back
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert len(again("good movie " * 40, truncation=True)["input_ids"]) == 16


def test_batches_padded_on_the_left_keep_their_tokens_through_every_trim():
    """A tokenizer with padding_side: left: cutting each batch to its longest row's length kept only [PAD] of its short
    rows, and the run trained and chose its epoch on near-chance accuracy without a word. Now nothing real is cut:
    the wrapper's logits, the packed batches and the evaluation equal the untrimmed model's."""
    from jointcompress.hf.evaluate import predict_logits
    from jointcompress.hf.wrapper import SequenceClassifier, pack

    model = tiny_bert(layers=2)
    ids = torch.randint(5, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, length in enumerate((12, 4, 7)):
        mask[row, 12 - length:] = 1  # left padding: each row's real tokens end at the last position
    ids = ids * mask
    expected = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(SequenceClassifier(model, trim=True)(pack(ids, mask)[1:]), expected[1:], atol=1e-6)
    tensors = {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(3, dtype=torch.long)}
    assert all(b["input_ids"].shape[1] == 12 for b in batches(tensors, batch_size=2))
    assert torch.allclose(predict_logits(model, tensors), expected, atol=1e-6)
    right = torch.flip(mask, [1])  # right padding is still cut to the longest row
    assert [b["attention_mask"].shape[1] for b in batches({**tensors, "attention_mask": right}, batch_size=2)] == [12, 7]


def test_a_tokenizer_larger_than_the_teachers_vocabulary_is_refused_before_training(tmp_path):
    """Another model's tokenizer saved beside the teacher gave ids past its embedding table: the run failed in the
    first forward with torch's "index out of range in self", under a long traceback through the training loop."""
    from transformers import BertConfig, BertForSequenceClassification

    from jointcompress.hf import recipe_steps as steps

    cfg = BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2)
    run, data = _hf_run(tmp_path, BertForSequenceClassification(cfg), "sentence\tlabel\ngood movie\t1\nawful\t0\n")
    with pytest.raises(DataError, match=r"the tokenizer gives token id \d+ \(the row 'good movie' holds one of 8 or more\), "
                                        r"but the teacher's embedding table has 8 rows \(config vocab_size\)"):
        steps.load_text(run, data)

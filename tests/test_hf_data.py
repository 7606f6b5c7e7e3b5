"""SST-2 TSV reading and tokenization; remote-code loading of pruned folders."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from hf_helpers import inputs, tiny_bert, tiny_tokenizer  # noqa: E402

from jointcompress.errors import DataError  # noqa: E402
from jointcompress.hf.data import batches, read_tsv, tokenize  # noqa: E402
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


def test_drop_layers_and_every_other():
    model = tiny_bert(layers=6)
    assert every_other(6, 3) == [1, 3, 5] and every_other(6, 6) == list(range(6))
    drop_layers(model, [0, 5])
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2
    model(**inputs())


def test_pruned_folder_loads_with_trust_remote_code_without_jointcompress(tmp_path):
    model = tiny_bert()
    prune_heads(model, [[0], [1, 2], [3], [0, 1]])
    out = export_folder(model, tiny_tokenizer(tmp_path), tmp_path / "out")
    x = inputs()
    with torch.no_grad():
        expected = model(**x).logits
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        "sys.modules['jointcompress'] = None  # prove jointcompress is not needed\n"
        "from transformers import AutoModelForSequenceClassification as A\n"
        f"m = A.from_pretrained(r'{out}', trust_remote_code=True).eval()\n"
        f"x = torch.load(r'{tmp_path / 'x.pt'}')\n"
        "with torch.no_grad(): print(repr(m(**x).logits.tolist()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "", "HF_MODULES_CACHE": str(tmp_path / "mods")})
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.tensor(eval(res.stdout.strip().splitlines()[-1]))
    assert torch.equal(got, expected)


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

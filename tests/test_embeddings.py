"""Embedding tables: quantized (and pruned) when a technique's `embeddings` switch asks for it,
under a size target as well; named by the size errors otherwise; refused when tied to another
layer's weight, whichever of the two the model registers first."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jointcompress import RecipeError, compress, finalize
from jointcompress.artifact import load, save
from jointcompress.artifact.size import dense_fp32_bytes
from jointcompress.recipe import QuantLSQ
from jointcompress.targets import TargetError
from jointcompress.techniques.base import selected_layers


class Bag(nn.Module):
    """Mean of token embeddings, then an MLP: the table is most of the file."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.l1, self.ln, self.out = nn.Embedding(50, 16), nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4)

    def forward(self, tokens):
        return self.out(F.gelu(self.ln(self.l1(self.emb(tokens).mean(1)))))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50, (256, 7), generator=g)
    return x, (x[:, 0] > 25).long() + 2 * (x[:, 1] > 25).long()


def _joint(embeddings: bool) -> dict:
    return {"mode": "joint", "target": {"ratio": 6}, "training": {"epochs": 3, "batch_size": 32},
            "techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True, "embeddings": embeddings},
                           {"type": "size_budget"}, {"type": "distill_kd"}]}


def test_embeddings_are_left_out_unless_asked():
    assert list(selected_layers(Bag(), QuantLSQ(type="quant_lsq"))) == ["l1", "out"]
    assert list(selected_layers(Bag(), QuantLSQ(type="quant_lsq", embeddings=True))) == ["emb", "l1", "out"]


def test_a_size_target_quantizes_the_table_when_asked_and_lands(tmp_path):
    x, y = _data()
    teacher = Bag().eval()
    model = copy.deepcopy(teacher)
    res = compress(model, _joint(True), (x, y), lambda m: {"accuracy": 0.0}, teacher=teacher)
    model.eval()
    masked = model(x[:32]).detach()
    spec = finalize(model, res.example_inputs)
    assert torch.equal(model(x[:32]), masked)  # finalize keeps the logits
    assert "emb" in spec.layers and 2 <= spec.layers["emb"].bits <= 8
    save(model, spec, tmp_path / "a", example_inputs=res.example_inputs)
    target = dense_fp32_bytes(teacher) / 6
    assert abs((tmp_path / "a" / "weights.jcw").stat().st_size / target - 1) < 0.02
    assert torch.equal(load(tmp_path / "a", Bag)(x[:32]), masked)


def test_without_the_switch_the_size_error_names_the_table_and_the_switch():
    x, y = _data()
    teacher = Bag().eval()
    with pytest.raises(TargetError, match=r"embedding tables \(emb\) hold 3,200 B .* quant_lsq.embeddings: true"):
        compress(copy.deepcopy(teacher), _joint(False), (x, y), lambda m: {"accuracy": 0.0}, teacher=teacher)


class TiedHeadFirst(nn.Module):
    """The output layer registered before the embedding that shares its weight."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 40, bias=False)
        self.emb = nn.Embedding(40, 16)
        self.emb.weight = self.head.weight

    def forward(self, t):
        return self.head(self.emb(t).mean(1))


@pytest.mark.parametrize("embeddings, fix", [(False, "Add 'head' to exclude"), (True, "Add 'head' and 'emb' to exclude")])
def test_a_tied_weight_is_refused_whichever_module_comes_first(embeddings, fix):
    x = torch.randint(0, 40, (64, 5))
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 4, "embeddings": embeddings}], "training": {"epochs": 1}}
    with pytest.raises(RecipeError, match=fix):
        compress(TiedHeadFirst(), recipe, (x, torch.randint(0, 40, (64,))), lambda m: {"accuracy": 0.0})


def test_a_token_model_with_its_table_quantized_deploys_to_int8():
    """Token ids reach ONNX Runtime as the integers the exported graph declares (they were cast
    to float32, which the session refused), and the table keeps ONNX Runtime's own scale. Inputs
    are made the graph's input type, whatever dtype they come in."""
    from jointcompress.deploy.int8 import quantize_int8
    from jointcompress.deploy.onnx_export import ort_input

    assert ort_input(torch.tensor([[1, 2]])).dtype == torch.int64
    assert ort_input(torch.ones(2, dtype=torch.float64)).dtype == torch.float32
    x, y = _data()
    model = Bag()
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 8, "embeddings": True}], "training": {"epochs": 2, "batch_size": 32}}
    res = compress(model, recipe, (x, y), lambda m: {"accuracy": 0.0})
    model.eval()
    spec = finalize(model, res.example_inputs)
    int8 = quantize_int8(model, spec, x[:64], x[:2])
    out, ref = int8(x[:64]), model(x[:64]).detach()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert torch.equal(int8(x[:64].int()), out)  # int32 ids: made the int64 the graph declares


def test_the_size_hint_names_a_tied_table_and_how_to_untie_it_not_the_switch_already_on():
    """GPT-2's wte is tied to lm_head, both excluded: the hint told the user to set quant_lsq.embeddings: true,
    which was set; nothing in the recipe reaches a tied table."""
    import torch.nn as nn

    from jointcompress.techniques.size_estimate import embedding_hint

    class LM(nn.Module):
        def __init__(self, tie: bool):
            super().__init__()
            self.wte, self.lm_head = nn.Embedding(40, 8), nn.Linear(8, 40, bias=False)
            if tie:
                self.lm_head.weight = self.wte.weight

    tied, free = embedding_hint(LM(True)), embedding_hint(LM(False))
    assert "tied to another layer (wte with lm_head)" in tied and "embeddings: true" not in tied
    assert "quant_lsq.embeddings: true quantizes them" in free


def test_the_size_hint_for_tied_and_untied_tables_together_leads_to_a_recipe_that_is_accepted():
    """GPT-2's wpe is free and its wte tied to lm_head: the hint said quant_lsq.embeddings: true for both, a
    recipe refused for the tied one. It names the switch for the free table with the tied one excluded, and
    the tied one apart; the recipe it spells prepares."""
    import copy

    import torch.nn as nn

    import jointcompress
    from jointcompress.techniques.size_estimate import embedding_hint

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(40, 8), nn.Embedding(6, 8)
            self.lm_head = nn.Linear(8, 40, bias=False)
            self.lm_head.weight = self.wte.weight

        def forward(self, ids):
            return self.lm_head(self.wte(ids) + self.wpe.weight[: ids.shape[1]])

    hint = embedding_hint(LM())
    assert "embedding tables (wpe) hold 192 B of it in fp32: quant_lsq.embeddings: true" in hint
    assert "with wte added to their exclude" in hint and "embedding tables (wte) hold 1,280 B" in hint
    torch.manual_seed(0)
    teacher = LM()
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 4, "exclude": ["lm_head", "wte"], "embeddings": True}]}
    session = jointcompress.prepare(copy.deepcopy(teacher), recipe, total_steps=2, example_inputs=torch.zeros(2, 6, dtype=torch.long))
    assert any(t.kind == "quant_lsq" for t in session.techniques)

"""Models of several inputs: batches `((x1, x2), y)` call model(x1, x2), dict batches call
model(**batch); training, the channel graph, finalize and the artifact all feed the model the same
way (model_call.py)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from jointcompress import compress, finalize
from jointcompress.artifact import load, save
from jointcompress.errors import DataError

STRUCTURED = {"training": {"epochs": 2, "batch_size": 16},
              "techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.5},
                             {"type": "quant_lsq", "bits": 8, "start": 0.3}]}


class TwoInputs(nn.Module):
    """Two branches summed: structured pruning must remove the same channels from both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.hidden, self.head = nn.Linear(10, 32), nn.Linear(6, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x1, x2):
        return self.head(F.relu(self.hidden(F.relu(self.a(x1) + self.b(x2)))))


class NamedInputs(TwoInputs):
    def forward(self, x1, x2, labels=None):  # dict batches pass the labels too
        return super().forward(x1, x2)


def _tensors():
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(96, 10, generator=g), torch.randn(96, 6, generator=g)
    return x1, x2, (x1[:, :2].sum(1) > x2[:, :2].sum(1)).long() + 2 * (x1[:, 2] > 0).long()


class Pairs(Dataset):
    def __init__(self, named: bool):
        self.x1, self.x2, self.y = _tensors()
        self.named = named

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.named:
            return {"x1": self.x1[i], "x2": self.x2[i], "labels": self.y[i]}
        return (self.x1[i], self.x2[i]), self.y[i]


@pytest.mark.parametrize("named", [False, True])
def test_a_model_of_two_inputs_is_pruned_finalized_and_loaded(named, tmp_path):
    cls = NamedInputs if named else TwoInputs
    model = cls()
    res = compress(model, STRUCTURED, DataLoader(Pairs(named), batch_size=16), lambda m: {"accuracy": 0.0})
    assert isinstance(res.example_inputs, dict if named else tuple)
    x1, x2, _ = _tensors()
    model.eval()
    before = model(x1[:8], x2[:8]).detach()
    spec = finalize(model, res.example_inputs)
    assert model.a.out_features == model.b.out_features == model.hidden.in_features == 16  # both branches shrink
    assert torch.allclose(model(x1[:8], x2[:8]), before, atol=1e-5)
    save(model, spec, tmp_path / "a", example_inputs=res.example_inputs)
    loaded = load(tmp_path / "a", cls)
    assert torch.allclose(loaded(x1[:8], x2[:8]), before, atol=1e-5)


def test_dict_batches_to_a_forward_without_labels_name_both_fixes():
    with pytest.raises(DataError) as err:
        compress(TwoInputs(), STRUCTURED, DataLoader(Pairs(named=True), batch_size=16), lambda m: {"accuracy": 0.0})
    assert "labels=None" in str(err.value) and "((x1, x2, ...), labels)" in str(err.value)


@pytest.mark.parametrize("named", [False, True])
def test_latency_tables_and_bench_feed_a_model_of_two_inputs(named):
    """The latency allocator's layer survey and timings and bench's MAC count cut and call the
    example inputs as the model takes them (they called model(example[:1]))."""
    from jointcompress.bench import batch_of, count_macs
    from jointcompress.graph import discover_groups
    from jointcompress.latency_targets import layer_sites, timed_ms

    x1, x2, _ = _tensors()
    model = (NamedInputs if named else TwoInputs)().eval()
    example = {"x1": x1[:4], "x2": x2[:4]} if named else (x1[:4], x2[:4])
    three = batch_of(example, 3)
    eight = batch_of(example, 8)  # more than the example holds: its first sample repeated
    parts = list(three.values()) if named else list(three)
    assert [tuple(t.shape) for t in parts] == [(3, 10), (3, 6)]
    first = eight["x2"] if named else eight[1]
    assert first.shape == (8, 6) and torch.equal(first[7], x2[0])
    assert count_macs(model, example) == 10 * 32 + 6 * 32 + 32 * 32 + 32 * 4
    groups, _ = discover_groups(model, example)
    sites = layer_sites(model, example, groups)
    assert {n: s.cin for n, s in sites.items()} == {"a": 10, "b": 6, "hidden": 32, "head": 32}
    assert timed_ms(model, example, batch=4, rounds=2, repeats=1) > 0


def test_3d_logits_of_a_1d_dense_prediction_are_refused_naming_the_transpose():
    """A frame tagger returning F.cross_entropy's [batch, classes, length] with [batch, length] labels was refused with
    the generic shapes, no word of the layout 3-D logits are read in or of the transpose that fits it."""
    from jointcompress.session.outputs import Batch, default_task_loss

    torch.manual_seed(0)
    y = torch.randint(0, 4, (8, 12))
    with pytest.raises(DataError, match=r"These read as \[batch, classes, positions\].*transpose\(1, 2\).*loss_fn="):
        default_task_loss(torch.randn(8, 4, 12), Batch(None, y))
    assert default_task_loss(torch.randn(8, 12, 4), Batch(None, y)).isfinite()  # the layout it reads


def test_an_mlp_traced_on_one_sample_keeps_its_channel_groups():
    """At batch 1 torch runs a Linear through views of [C] as [1, C], read as a per-channel tensor broadcast over
    the channels: prepare(..., example_inputs=x[:1]) found no prunable group in a plain MLP, which x[:8] prunes."""
    import jointcompress

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                   torch.nn.Linear(32, 10))

    recipe = {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "criterion": "magnitude"}]}
    x = torch.randn(8, 20)
    groups = {}
    for batch in (8, 1):
        session = jointcompress.prepare(mlp(), recipe, total_steps=10, example_inputs=x[:batch])
        groups[batch] = sorted(g.name for t in session.techniques if t.kind == "prune_structured" for g in t.groups)
    assert groups[1] == groups[8] == ["0", "2"]


def test_a_list_of_ready_made_batches_is_named_and_the_loader_it_needs_trains():
    """A list of dict (or tuple) batches was told "a DataLoader or a Dataset yielding (x, y[, index]), or a tuple (x, y)
    ... numpy arrays: torch.from_numpy(x).float()", though dict batches are supported through a loader; the message
    names what was given and the one line that makes it a loader, and that loader trains."""
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    batches = [(x[i:i + 32], (x[i:i + 32, 0] > 0).long()) for i in range(0, 96, 32)]
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 8}], "training": {"epochs": 1}}
    with pytest.raises(DataError, match=r"train_data: a list of 3 tuple items; .* dicts of tensors .*"
                                        r"\.DataLoader\(batches, batch_size=None, shuffle=True\)"):
        compress(model, recipe, batches, lambda m: 0.5)
    with pytest.raises(DataError, match=r"train_data: a list of 1 dict items"):
        compress(model, recipe, [{"input_ids": torch.ones(2, 4, dtype=torch.long)}], lambda m: 0.5)
    result = compress(model, recipe, DataLoader(batches, batch_size=None, shuffle=True), lambda m: 0.5)
    assert result.history.epochs[-1]["step"] == 3  # one epoch of the three batches as they were made

"""training.micro_batches: the built-in loop forwards each batch in parts and steps once. The session
resolves the parts as one batch (coordination settles their summed per-term gradients, the Fisher
estimate counts all their samples), so the run is the run of the whole batch, in less memory."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import jointcompress
from jointcompress.training.micro_batches import micro_batches


def test_a_batch_splits_into_parts_that_cover_it_with_their_shares():
    x, y, idx = torch.randn(10, 3), torch.arange(10), torch.arange(10) + 100
    parts = micro_batches((x, y, idx), 4)
    assert [len(p[0]) for p, _ in parts] == [3, 3, 2, 2]
    assert sum(share for _, share in parts) == pytest.approx(1.0)
    assert torch.equal(torch.cat([p[2] for p, _ in parts]), idx)  # the sample indices (teacher cache) follow
    rows = micro_batches({"input_ids": torch.ones(5, 7), "labels": torch.zeros(5), "name": "kept"}, 2)
    assert [p["input_ids"].shape for p, _ in rows] == [(3, 7), (2, 7)] and rows[1][0]["name"] == "kept"
    assert len(micro_batches((x[:2], y[:2]), 8)) == 2  # fewer samples than parts: one part each
    from collections import UserDict

    encoded = UserDict({"input_ids": torch.ones(6, 3), "attention_mask": torch.ones(6, 3)})  # as BatchEncoding
    assert [p["input_ids"].shape[0] for p, _ in micro_batches(encoded, 3)] == [2, 2, 2]
    assert micro_batches((x, y), 1) == [((x, y), 1.0)]


def _run(parts: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 2))
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        teacher[2].weight.add_(0.3 * torch.randn_like(teacher[2].weight))  # a teacher the task disagrees with
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=False)
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 4}, {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}],
              "coordination": {"strategy": "pcgrad", "accuracy_as_one": False},
              "training": {"epochs": 1, "lr": 0.01, "micro_batches": parts}}
    result = jointcompress.compress(model, recipe, data, lambda m: {"accuracy": 0.0}, teacher=teacher)
    changed = [s["changed"] for s in result.history.steps]
    assert changed and max(changed) > 1e-3  # PCGrad projected: task and distillation conflicted
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_four_micro_batches_train_the_model_one_batch_trains():
    one, four = _run(1), _run(4)
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_micro_batches_of_one_sample_beside_batchnorm_are_refused_naming_the_setting():
    """BatchNorm cannot train on one sample: torch's ValueError came from inside the first forward."""
    from jointcompress.errors import RecipeError

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 4}], "training": {"epochs": 1, "batch_size": 8, "micro_batches": 8}}
    with pytest.raises(RecipeError, match=r"training.micro_batches: 8 parts .* BatchNorm \(1\)"):
        jointcompress.compress(model, recipe, data, lambda m: {"accuracy": 0.0})
    recipe["training"]["micro_batches"] = 4  # two samples a part: BatchNorm trains
    jointcompress.compress(model, recipe, data, lambda m: {"accuracy": 0.0})


def test_a_session_checkpoint_loads_into_a_session_with_other_micro_batches():
    """A memory setting: session.load_state_dict (your loop, CompressionTrainer's resume) matches the recipe
    without it, while a change of what the run does is still refused."""
    from jointcompress.errors import RecipeError

    def session(**training):
        recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5}], "training": training}
        return jointcompress.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), recipe, total_steps=10)

    state = session(micro_batches=1).state_dict()
    session(micro_batches=4).load_state_dict(state)
    with pytest.raises(RecipeError, match="different recipe"):
        session(micro_batches=1, lr=0.5).load_state_dict(state)

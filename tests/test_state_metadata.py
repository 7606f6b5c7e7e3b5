"""A model whose modules read the state dict's version metadata while loading (torchvision's MNASNet does:
`_version = 2` and a `_load_from_state_dict` that refuses a state without it). The run's best-state
restore, checkpoint resume and the artifact loader load states copied key by key or read from a file,
which carry no metadata: each crashed with the model's own "version should be set" error."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jointcompress import compress, prepare
from jointcompress.artifact import load, save


class Versioned(nn.Module):
    _version = 2

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.bn(self.c1(x))))).mean((2, 3)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        version = local_metadata.get("version")
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def build() -> Versioned:
    torch.manual_seed(1)
    return Versioned().eval()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 3, 12, 12, generator=g), torch.randint(0, 4, (64,), generator=g)


def test_the_best_state_restore_loads_a_model_that_reads_its_version(data):
    x, y = data
    teacher, student = build(), build()
    recipe = {"training": {"epochs": 2, "batch_size": 16, "keep": "best"},
              "techniques": [{"type": "prune_structured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 8, "start": 0.3}]}
    result = compress(student, recipe, (x, y), lambda m: {"accuracy": 0.5}, teacher=teacher)
    assert [e["epoch"] for e in result.history.epochs] == [1, 2]  # finished: the best evaluated state restored
    with torch.no_grad():
        assert torch.isfinite(student(x)).all()


def test_a_saved_artifact_of_such_a_model_loads_with_the_same_logits(data, tmp_path):
    x, y = data
    student = build()
    session = prepare(student, {"techniques": [{"type": "prune_structured", "sparsity": 0.5},
                                               {"type": "quant_lsq", "bits": 8}]}, total_steps=2, example_inputs=x[:2])
    opt = torch.optim.Adam(session.param_groups(lr=1e-3))
    session.bind(opt)
    for i in range(2):
        xb, yb = x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]
        terms = session.loss(student(xb), (xb, yb))
        opt.zero_grad()
        session.backward(terms)
        session.before_step()
        opt.step()
        session.after_step()
    spec = session.finalize()
    student.eval()
    save(student, spec, tmp_path / "artifact", example_inputs=x[:2])
    loaded = load(tmp_path / "artifact", build)
    with torch.no_grad():
        assert torch.equal(loaded(x), copy.deepcopy(student)(x))

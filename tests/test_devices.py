"""Inputs follow the model (model_call), and the commands' --device is read once and refused,
named, where this machine lacks the device. The GPU runs themselves are in test_cuda.py."""
from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn as nn

from cli_helpers import run_cli
from jointcompress import JointCompressError
from jointcompress.devices import resolve_device
from jointcompress.model_call import call_model, model_device, to_device

META = torch.device("meta")  # a device every machine has: tensors with shapes and no data


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_inputs_of_every_form_follow_the_model_to_its_device():
    model = _TwoInputs().to(META)
    x, y = torch.randn(5, 3), torch.randn(5, 4)
    for out in (call_model(model, (x, y)), call_model(model, [x, y]), call_model(model, {"x": x, "y": y})):
        assert out.device == META and out.shape == (5, 2)
    single = nn.Linear(3, 2).to(META)
    assert call_model(single, x).device == META


def test_to_device_moves_nested_tensors_only_and_leaves_tensors_already_there_as_they_are():
    x = torch.randn(2, 3)
    moved = to_device({"ids": x, "pair": (x, [x]), "note": "kept", "n": 3}, META)
    assert moved["ids"].device == META and moved["pair"][0].device == META and moved["pair"][1][0].device == META
    assert isinstance(moved["pair"], tuple) and isinstance(moved["pair"][1], list)
    assert moved["note"] == "kept" and moved["n"] == 3
    assert to_device(x, torch.device("cpu")) is x  # no copy where nothing moves
    assert to_device(x, None) is x
    Pair = namedtuple("Pair", "a b")
    pair = Pair(x, x)
    assert to_device(pair, META) is pair  # a named tuple is the user's type: passed on as given


def test_model_device_is_the_first_weight_s_and_none_without_weights():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.Linear(2, 2).to(META)) == META
    assert model_device(nn.ReLU()) is None
    assert model_device(lambda t: t) is None
    assert torch.equal(call_model(nn.ReLU(), torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))


def test_resolve_device_reads_cpu_and_auto_and_refuses_what_is_not_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" AUTO ").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(JointCompressError, match=r"--device 'gpu0': not a device; give cpu, cuda"):
        resolve_device("gpu0")
    with pytest.raises(JointCompressError, match=r"training on meta is not supported"):
        resolve_device("meta")
    with pytest.raises(JointCompressError, match=r"(no CUDA device is visible|numbered from 0)"):
        resolve_device(f"cuda:{torch.cuda.device_count() + 3}")
    if not torch.cuda.is_available():
        with pytest.raises(JointCompressError, match=r"--device 'cuda': no CUDA device is visible here.*use --device cpu"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
@pytest.mark.parametrize("command", [["compress", "RECIPE"], ["compare", "RECIPE", "--ratios", "10"], ["demo", "--out", "OUT"]])
def test_commands_refuse_a_cuda_device_this_machine_lacks_before_any_work(monkeypatch, capsys, tmp_path, command):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ntechniques:\n  - {type: quant_lsq, bits: 4}\n")
    args = [str(recipe) if a == "RECIPE" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    code, out = run_cli(monkeypatch, capsys, *args, "--out" if command[0] != "demo" else "--force",
                        *([str(tmp_path / "out")] if command[0] != "demo" else []), "--device", "cuda")
    assert code == 2 and "--device 'cuda': no CUDA device is visible here" in out and "Traceback" not in out
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_session_to_moves_what_it_holds_beside_a_model_moved_after_prepare():
    """The transformers Trainer moves the model in its constructor, after prepare(): the masks and the
    teacher, which are not the model's submodules, must follow (CompressionTrainer calls session.to)."""
    from jointcompress import prepare

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    teacher = nn.Sequential(nn.Linear(8, 4))
    session = prepare(model, {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5},
                                             {"type": "quant_lsq", "bits": 4}, {"type": "distill_kd"}]},
                      total_steps=10, teacher=teacher, example_inputs=torch.randn(2, 8))
    prune = next(t for t in session.techniques if t.kind == "prune_unstructured")
    model.to(META)
    assert all(m.scores.device.type == "cpu" for m in prune.masks.values())  # what the move leaves behind
    assert session.to(META) is session
    assert all(m.scores.device == META and m.hard.device == META for m in prune.masks.values())
    assert next(teacher.parameters()).device == META


def test_a_teacher_on_another_device_than_the_model_is_refused_before_training():
    from jointcompress import DataError, compress

    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    model, teacher = nn.Sequential(nn.Linear(8, 4)), nn.Sequential(nn.Linear(8, 4)).to(META)
    with pytest.raises(DataError, match=r"teacher: it is on meta and the model on cpu.*teacher.to\(device\)"):
        compress(model, {"techniques": [{"type": "distill_kd"}], "training": {"epochs": 1, "batch_size": 8}},
                 (x, y), lambda m: 0.0, teacher=teacher)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_an_hf_recipe_refuses_a_cuda_device_this_machine_lacks_before_the_teacher_loads(monkeypatch, capsys, tmp_path):
    from jointcompress.recipe import builtin_recipe

    code, out = run_cli(monkeypatch, capsys, "compress", str(builtin_recipe("hf_sst2")), "--weights",
                        str(tmp_path / "no_teacher"), "--out", str(tmp_path / "out"), "--device", "cuda")
    assert code == 2 and "--device 'cuda': no CUDA device is visible here" in out and "Traceback" not in out
    assert not (tmp_path / "out").exists()

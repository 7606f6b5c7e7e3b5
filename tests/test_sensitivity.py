"""The sensitivity scan: per layer and per coupled channel group, as JSON, table and heatmap."""
import json

import pytest
import torch
from typer.testing import CliRunner

from jointcompress.cli import app
from jointcompress.data import evaluator, load_digits
from jointcompress.models import build_model
from jointcompress.sensitivity import drop_at, scan, tolerable_sparsity


def test_scan_layers_and_groups():
    split = load_digits()
    torch.manual_seed(0)
    model = build_model("lenet5", image_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = scan(model, evaluator(split.x_test, split.y_test), split.x_train[:2], sparsities=(0.5, 0.99), bits=(8, 2),
               group_sparsities=(0.5,))
    assert set(out["layers"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert set(out["layers"]["fc1"]["sparsity"]) == {"0.5", "0.99"} and set(out["layers"]["fc1"]["bits"]) == {"8", "2"}
    # coupled layers are tested together: the conv1 group also contains conv2's input side
    assert "conv2" in out["groups"]["conv1"]["layers"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    json.dumps(out)


def test_interpolation():
    curve = {"0.5": 0.0, "0.9": 0.04}
    assert drop_at(curve, 0.7) == pytest.approx(0.02)
    assert tolerable_sparsity(curve, 0.01) == pytest.approx(0.6, abs=2e-3)


def test_cli_writes_json_and_heatmap(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ntraining: {epochs: 1}\n")
    res = CliRunner().invoke(app, ["sensitivity", str(recipe), "--teacher-epochs", "1", "--sparsities", "0.5,0.9",
                                   "--bits", "4,2", "--group-sparsities", "0.5", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert set(data["layers"]) == {"fc1", "fc2", "fc3"} and data["groups"]
    assert (tmp_path / "s" / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert "fc1" in res.output

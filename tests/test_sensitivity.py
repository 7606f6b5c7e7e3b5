"""The sensitivity scan: per layer and per coupled channel group, as JSON, table and heatmap."""
import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from jointcompress.cli import app
from jointcompress.data import evaluator, load_digits
from jointcompress.models import build_model
from jointcompress.sensitivity import drop_at, magnitude_prune_, scan, tolerable_sparsity


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


def _scan_result():
    """What scan() writes for one layer (sparsities 0.9, bits 8) and one group at three channel shares."""
    return {"baseline": 0.9, "layers": {"fc1": {"sparsity": {"0.9": 0.05}, "bits": {"8": 0.001}}},
            "groups": {"fc1": {"layers": ["fc1", "fc2"], "sparsity": {"0.25": 0.01, "0.5": 0.02, "0.75": 0.07}}}}


def test_every_group_value_sits_under_its_own_header():
    """The group row's "ch 0.25" / "ch 0.5" sat under s=0.9 and 8b, and "ch 0.75" was cut off."""
    from jointcompress.commands.sensitivity_cmd import group_table, layer_table

    layers = layer_table(_scan_result(), "lenet300", "digits", [0.9], [8])
    assert {c.header: list(c.cells) for c in layers.columns} == {"layer": ["fc1"], "s=0.9": ["5.00"], "8b": ["0.10"]}
    groups = group_table(_scan_result(), [0.25, 0.5, 0.75])
    assert {c.header: list(c.cells) for c in groups.columns} == {
        "group (layers)": ["fc1 (fc1, fc2)"], "ch 0.25": ["1.00"], "ch 0.5": ["2.00"], "ch 0.75": ["7.00"]}


def test_out_holding_another_runs_files_is_refused_without_force(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ntraining: {epochs: 1}\n")
    other = tmp_path / "run"
    other.mkdir()
    (other / "summary.json").write_text("{}")
    args = ["sensitivity", str(recipe), "--teacher-epochs", "1", "--sparsities", "0.9", "--bits", "8",
            "--group-sparsities", "0.5", "--out", str(other)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "--force" in str(res.exception) and "summary.json" in str(res.exception)
    assert sorted(p.name for p in other.iterdir()) == ["summary.json"]  # nothing written
    res = CliRunner().invoke(app, [*args, "--force"])
    assert res.exit_code == 0, res.output
    assert (other / "sensitivity.json").is_file() and (other / "summary.json").read_text() == "{}"
    again = tmp_path / "s"  # a folder holding only an earlier scan's outputs is a re-run of it
    again.mkdir()
    (again / "sensitivity.json").write_text("{}")
    args[-1] = str(again)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads((again / "sensitivity.json").read_text())["layers"]


def test_the_heat_map_is_written_atomically(tmp_path, monkeypatch):
    """savefig wrote straight to the final path: a kill mid-write left a broken PNG beside a new JSON."""
    import jointcompress.io as jio
    from jointcompress.sensitivity import save_heatmap

    written = []
    real = jio.atomic_write_bytes
    monkeypatch.setattr(jio, "atomic_write_bytes", lambda p, d: (written.append(str(p)), real(p, d))[1])
    result = {"metric": "accuracy", "sparsities": [0.5], "bits": [4], "group_sparsities": [], "groups": {},
              "layers": {"fc": {"sparsity": {"0.5": 0.01}, "bits": {"4": 0.02}}}}
    save_heatmap(result, tmp_path / "s.png")
    assert written == [str(tmp_path / "s.png")] and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


class _ConvNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_a_model_with_batchnorm_is_read_with_its_statistics_re_estimated():
    """Each reading (baseline and every drop) first re-estimates the statistics on the given batches, the
    way training evaluates: the drop equals the one measured by hand on a pruned copy whose statistics
    were averaged over the same batches; the model given is left as it was."""
    torch.manual_seed(0)
    model = _ConvNorm()
    batches = [torch.randn(16, 1, 6, 6) for _ in range(3)]
    model.train()
    for b in batches * 4:  # running averages of the unpruned layer
        model(b)
    model.eval()
    held_out, before = torch.randn(32, 1, 6, 6), copy.deepcopy(model.state_dict())
    reference = model(held_out).detach()

    def closeness(m):  # continuous: every change in the statistics shows
        with torch.no_grad():
            return {"accuracy": -float((m(held_out) - reference).pow(2).mean())}

    def by_hand(sparsity):
        m = copy.deepcopy(model)
        if sparsity:
            magnitude_prune_(m.conv.weight.data, sparsity)
        m.bn.reset_running_stats()
        m.bn.momentum = None
        m.bn.train()
        with torch.no_grad():
            for b in batches:
                m(b)
        m.eval()
        return closeness(m)["accuracy"]

    kw = dict(sparsities=(0.9,), bits=(8,), groups=False)
    stale = scan(model, closeness, batches[0][:2], **kw)
    fresh = scan(model, closeness, batches[0][:2], norm_batches=batches, **kw)
    assert fresh["norm_batches"] == 3 and stale["norm_batches"] == 0
    assert fresh["baseline"] == pytest.approx(by_hand(0.0), rel=1e-5)
    assert fresh["layers"]["conv"]["sparsity"]["0.9"] == pytest.approx(by_hand(0.0) - by_hand(0.9), rel=1e-4)
    assert stale["layers"]["conv"]["sparsity"]["0.9"] != pytest.approx(fresh["layers"]["conv"]["sparsity"]["0.9"], rel=0.1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_reading_whose_statistics_pass_is_refused_uses_the_models_own(monkeypatch):
    """A pass refused (non-finite statistics) leaves the statistics in place; inside the scan those were the last
    reading's, measured with another layer compressed. Each reading starts from the model's own."""
    import jointcompress.sensitivity as sensitivity

    torch.manual_seed(0)
    model = _ConvNorm()
    model.eval()
    own = model.bn.running_mean.clone()
    batches = [torch.randn(16, 1, 6, 6) + 3 for _ in range(2)]  # far from the model's own statistics
    real, seen = sensitivity.recalibrate_norms, []

    def refused_after_the_first(m, *args):
        seen.append(m.bn.running_mean.clone())
        return real(m, *args) if len(seen) == 1 else 0

    monkeypatch.setattr(sensitivity, "recalibrate_norms", refused_after_the_first)
    scan(model, lambda m: 0.5, batches[0][:2], sparsities=(0.5,), bits=(8,), groups=False, norm_batches=batches)
    assert len(seen) == 5 and all(torch.equal(s, own) for s in seen)  # the baseline, conv and fc at two settings

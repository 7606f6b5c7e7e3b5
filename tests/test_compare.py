"""compare: every variant at every ratio with the same budgets; JSON, CSV, Pareto PNG, TensorBoard."""
import csv
import json

from typer.testing import CliRunner

from jointcompress.cli import app
from jointcompress.compare import pareto_front


def test_pareto_front():
    assert pareto_front([(10, 2.0), (20, 3.0), (20, 5.0), (15, 4.0)]) == [(10, 2.0), (20, 3.0)]


def test_compare_cli_tiny(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: lenet300\ndata: digits\ntechniques:\n"
        "  - {type: prune_unstructured, sparsity: 0.9, end: 0.6, regularization: 1.0}\n"
        "  - {type: quant_lsq, bits: 4, start: 0.3}\n"
        "training: {epochs: 1, batch_size: 128, lr: 0.002}\ncoordination: {every: 2, log_every: 2}\n")
    out, tb = tmp_path / "cmp", tmp_path / "tb"
    res = CliRunner().invoke(app, ["compare", str(recipe), "--ratios", "20", "--seeds", "1", "--teacher-epochs", "1",
                                   "--variants", "joint-pcgrad,sequential", "--out", str(out), "--tensorboard", str(tb)])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "compare.json").read_text())
    assert {r["variant"] for r in result["runs"]} == {"joint-pcgrad", "sequential"}
    for r in result["runs"]:
        manifest = json.loads((out / r["dir"] / "artifact" / "manifest.json").read_text())
        assert r["file_bytes"] == manifest["weights_file_bytes"]
        assert abs(r["file_bytes"] / r["target_bytes"] - 1) <= 0.02, r  # each variant steered onto the same size
        assert (out / r["dir"] / "history.json").is_file()
    budgets = [json.loads((out / r["dir"] / "artifact" / "manifest.json").read_text())["recipe"]["techniques"][0]["layer_sparsity"]
               for r in result["runs"]]
    assert budgets[0] == budgets[1]  # the same starting per-layer budgets for every variant
    assert len(list(csv.DictReader((out / "compare.csv").open()))) == 2
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    events = list(tb.rglob("events.out.tfevents.*"))
    assert len(events) == 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent)).Reload()
    tags = acc.Tags()["scalars"]
    assert "loss/task" in tags and "coordination/conflict_rate" in tags

"""compare records a ratio it cannot reach, with the reason, and runs the others."""
import json

from typer.testing import CliRunner

from jointcompress.cli import app


def test_unreachable_ratio_is_recorded_and_the_run_goes_on(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: lenet300\ndata: digits\ntechniques:\n"
        "  - {type: prune_unstructured, sparsity: 0.9, end: 0.6}\n"
        "  - {type: quant_lsq, bits: 4, start: 0.3}\n"
        "training: {epochs: 1, batch_size: 128, lr: 0.002}\ncoordination: {every: 2, log_every: 2}\n")
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["compare", str(recipe), "--ratios", "5000,20", "--seeds", "1", "--teacher-epochs", "1",
                                   "--variants", "sequential", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "compare.json").read_text())
    assert [r["ratio_target"] for r in result["runs"]] == [20]
    (u,) = result["unreachable"]
    assert u["ratio_target"] == 5000 and u["seed"] == 0 and "cannot be reached" in u["reason"]
    assert "keeps" in u["reason"] and "B" in u["reason"]  # the floors, in bytes
    assert "not run, target unreachable" in res.output

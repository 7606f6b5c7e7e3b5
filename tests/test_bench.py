"""bench() measures what it claims; the bench and dry-run commands work end to end."""
import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from artifact_helpers import SmallCNN, example_input, fake_finalize
from jointcompress.artifact import save
from jointcompress.bench import bench, count_macs, count_params, render_table


def test_count_macs_and_params():
    m = SmallCNN()
    # conv1: 8*28*28*25, conv2: 16*10*10*8*25, fc1: 400*32, fc2: 32*10
    assert count_macs(m, example_input()) == 8 * 784 * 25 + 16 * 100 * 200 + 400 * 32 + 320
    p = count_params(m)
    assert p["total"] == sum(x.numel() for x in m.parameters()) and p["nonzero"] <= p["total"]


def test_bench_before_after(tmp_path):
    x = example_input()
    after, spec = fake_finalize(SmallCNN(), x)
    save(after, spec, tmp_path, example_inputs=x)
    ys = torch.zeros(2, dtype=torch.long)
    res = bench(SmallCNN(), after, x, eval_fn=lambda m: float((m(x).argmax(1) == ys).float().mean()),
                artifact_dir=tmp_path, runs=3)
    json.dumps(res)
    b, a = res["before"], res["after"]
    assert a["params"]["total"] < b["params"]["total"] and a["macs"] < b["macs"] / 2
    files = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert a["bytes_on_disk"] == files and res["ratios"]["bytes_on_disk"] > 5
    for key in ("latency_ms_b1", "latency_ms_b64"):
        assert b[key] > 0 and a[key] > 0
    assert 0 <= a["accuracy"] <= 1
    table = render_table(res)
    assert table.row_count >= 7


@pytest.fixture
def app():
    from jointcompress.commands import bench_cmd, dryrun_cmd

    app = typer.Typer()
    bench_cmd.register(app)
    dryrun_cmd.register(app)
    return app


def test_dry_run_command_lists_groups_and_skipped(app):
    pytest.importorskip("jointcompress.models")
    r = CliRunner().invoke(app, ["dry-run", "--model", "resnet"])
    assert r.exit_code == 0, r.output
    assert "stem" in r.output and "layer1.conv1" in r.output
    assert "fc" in r.output and "classes are never removed" in r.output
    assert "prune_blocks can remove whole: layer1" in r.output


def test_bench_command_on_artifact(app, tmp_path):
    models = pytest.importorskip("jointcompress.models")
    x = example_input()
    model, spec = fake_finalize(models.build_model("lenet5"), x)
    spec.recipe = {"model": "lenet5"}
    save(model, spec, tmp_path / "art", builder=lambda: models.build_model("lenet5"), example_inputs=x)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--json", str(out), "--runs", "2"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["model"] == "lenet5" and res["after"]["macs"] < res["before"]["macs"]
    assert "bytes on disk" in r.output

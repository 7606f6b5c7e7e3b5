"""Where the bytes go: the per-layer, per-part breakdown sums exactly to the weights file."""
import json

import pytest
from typer.testing import CliRunner

from artifact_helpers import MLP, SmallCNN, TinyResNet, example_input, fake_finalize
from jointcompress.artifact import byte_breakdown, format_breakdown, read_manifest, save
from jointcompress.artifact.size import KINDS


@pytest.mark.parametrize("cls", [MLP, SmallCNN, TinyResNet])
@pytest.mark.parametrize("container", ["jcw", "safetensors"])
def test_breakdown_sums_exactly_to_the_file(tmp_path, cls, container):
    x = example_input()
    model, spec = fake_finalize(cls(), x)
    manifest = save(model, spec, tmp_path, example_inputs=x, container=container)
    bd = byte_breakdown(read_manifest(tmp_path))
    on_disk = (tmp_path / manifest["weights_file"]).stat().st_size
    assert bd["file"] == on_disk == sum(bd["kinds"].values()) == sum(sum(r.values()) for r in bd["rows"].values())
    for name, rec in manifest["layers"].items():  # each layer row is exactly its parts
        assert sum(bd["rows"][name].values()) == sum(p["bytes"] for p in rec["parts"].values())
        assert bd["rows"][name]["biases"] == rec["parts"].get("bias", {}).get("bytes", 0)
    assert set(bd["kinds"]) == set(KINDS) and bd["kinds"]["container"] == manifest["bytes"]["container"]
    table = format_breakdown(bd)
    assert table[-1][0] == "all" and table[-1][-2] == f"{on_disk:,}" and table[-1][-1] == "100.0"


def test_bench_command_prints_the_breakdown(tmp_path):
    from jointcompress.cli import app
    from jointcompress.models import build_model

    x = example_input()
    model, spec = fake_finalize(build_model("lenet5"), x)
    spec.recipe = {"model": "lenet5"}
    manifest = save(model, spec, tmp_path / "art", example_inputs=x)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--json", str(out), "--runs", "1"], terminal_width=200)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["breakdown"]["file"] == manifest["weights_file_bytes"]
    assert f"weights file: {manifest['weights_file_bytes']:,} B by part" in r.output
    assert "conv1" in r.output and f"{manifest['weights_file_bytes']:,}" in r.output.split("by part")[1]


def test_html_report_shows_the_breakdown(tmp_path):
    from jointcompress.report import Run, RunDir, render_html

    x = example_input()
    model, spec = fake_finalize(SmallCNN(), x)
    manifest = save(model, spec, tmp_path, example_inputs=x)
    page = render_html(RunDir("compress", runs=[Run("joint", manifest)], title="t"), {}, [])
    section = page.split("Where the bytes go")[1]
    assert "<h3>joint</h3>" in section and f"<td>{manifest['weights_file_bytes']:,}</td>" in section
    for kind in KINDS:
        assert f"<th>{kind}</th>" in section

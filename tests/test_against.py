"""`jointcompress bench --against torch-pruning` runs both contenders and writes them to JSON;
its input errors are clear. No timing is asserted (timings never in tests)."""
import json
import sys

import pytest
import typer
from typer.testing import CliRunner

from jointcompress.commands import bench_cmd


@pytest.fixture
def app():
    app = typer.Typer()
    bench_cmd.register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps "bench" a named sub-command
        pass

    return app


def test_against_torch_pruning_writes_both_contenders(app, tmp_path):
    pytest.importorskip("torch_pruning")
    pytest.importorskip("onnxruntime")
    out, teacher = tmp_path / "against.json", tmp_path / "teacher.safetensors"
    args = ["bench", "--against", "torch-pruning", "--model", "lenet5", "--data", "digits", "--teacher", str(teacher),
            "--teacher-epochs", "1", "--epochs", "1", "--tp-steps", "2", "--runs", "2", "--select-images", "100",
            "--train-limit", "256", "--speedup", "1000", "--json", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    contenders = {"dense_fp32_torch", "ours_fp32_ort", "ours_int8_ort", "tp_fp32_torch", "tp_int8_torch_x86",
                  "tp_fp32_ort", "tp_int8_ort"}
    assert contenders <= set(res["accuracy"]) and all(0 <= res["accuracy"][k] <= 1 for k in contenders)
    for batch in ("batch1", "batch64"):
        assert contenders <= set(res["timing"][batch]["latency_ms"]) and contenders <= set(res["timing"][batch]["alone_ms"])
    assert res["threads"] == 1 and res["train_rows"] == 256
    dense = res["widths"]["dense"]
    for side in ("ours", "torch_pruning"):  # both really removed channels
        assert sum(res["widths"][side].values()) < sum(dense.values())
        assert res["macs_per_sample"][side] < res["macs_per_sample"]["dense"]
    assert len(res["torch_pruning"]["stages"]) == 2 and res["torch_pruning"]["train_steps"] == res["ours"]["train_steps"]
    assert teacher.is_file() and "vs Torch-Pruning" in r.output
    assert res["teacher"].startswith("trained here")


def test_against_without_torch_pruning_is_a_clear_error(app, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails as if not installed
    r = CliRunner().invoke(app, ["bench", "--against", "torch-pruning", "--model", "lenet5", "--data", "digits"])
    assert r.exit_code != 0
    assert "pip install torch-pruning" in str(r.exception)


@pytest.mark.parametrize("argv, words", [
    (["--against", "nncf", "--model", "lenet5"], "--against 'nncf' is unknown"),
    (["--against", "torch-pruning", "--model", "vgg"], "--model 'vgg' is not supported"),
    (["--against", "torch-pruning"], "needs --model"),
    ([], "needs ARTIFACT_DIR"),
])
def test_against_bad_input(app, argv, words):
    pytest.importorskip("torch_pruning")
    r = CliRunner().invoke(app, ["bench", *argv, "--data", "digits"])
    assert r.exit_code != 0 and words in str(r.exception)


def test_unsupported_model_is_a_clear_error():
    import torch

    from jointcompress.deploy.against import check_supported
    from jointcompress.errors import UnsupportedModelError

    class NoChannels(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10]

    with pytest.raises(UnsupportedModelError, match="no prunable channel group"):
        check_supported(NoChannels(), torch.randn(2, 1, 8, 8))

"""`jointcompress bench --against torch-pruning` runs both contenders and writes them to JSON;
its input errors are clear. No timing is asserted (timings never in tests)."""
import dataclasses
import json
from pathlib import Path
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


def test_against_torch_pruning_writes_both_contenders(app, tmp_path, monkeypatch):
    pytest.importorskip("torch_pruning")
    pytest.importorskip("onnxruntime")
    import tempfile

    out, teacher = tmp_path / "against.json", tmp_path / "teacher.safetensors"
    args = ["bench", "--against", "torch-pruning", "--model", "lenet5", "--data", "digits", "--teacher", str(teacher),
            "--teacher-epochs", "1", "--epochs", "1", "--tp-steps", "2", "--runs", "2", "--select-images", "100",
            "--train-limit", "256", "--speedup", "2", "--min-width", "4", "--json", str(out)]
    scratch = set(Path(tempfile.gettempdir()).glob("jointcompress-against-*"))
    monkeypatch.setattr(sys, "argv", ["jointcompress", *args])  # as typed: the file's command runs it again
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["command"] == "jointcompress " + " ".join(args) and res["data"] == "digits"
    assert res["config"]["teacher_epochs"] == 1  # trained here (read from --teacher, it is null)
    # the ONNX files went to a temporary folder that is gone (each run left one behind); --workdir keeps them
    assert res["workdir"] is None and set(Path(tempfile.gettempdir()).glob("jointcompress-against-*")) <= scratch
    contenders = {"dense_fp32_torch", "dense_fp32_ort", "ours_fp32_ort", "ours_int8_ort", "ours_int8_torch_x86",
                  "tp_fp32_torch", "tp_int8_torch_x86", "tp_fp32_ort", "tp_int8_ort"}
    assert contenders <= set(res["accuracy"]) and all(0 <= res["accuracy"][k] <= 1 for k in contenders)
    for batch in ("batch1", "batch64"):
        assert contenders <= set(res["timing"][batch]["latency_ms"]) and contenders <= set(res["timing"][batch]["alone_ms"])
    # --select-images 100 of 256 rows: a tenth (25) held out for the choices, trained on by no contender
    assert res["threads"] == 1 and res["train_rows"] == 256 - 25 and res["config"]["min_width"] == 4
    assert res["selected_on"] == "validation (25 training images held out)"
    target = res["target"]  # whether the deployed allocation met its target is said, and true to the numbers
    assert isinstance(target["met"], bool) and target["met"] == (target["measured_ms"] <= target["latency_ms_b64"])
    for side in ("ours_fp32_ort", "tp_fp32_ort"):  # both deployed the same way, and it is recorded
        runtime = res["runtimes"][side]
        assert runtime["threads"] == 1 and runtime["spinning"] == "off" and "batch >= 8" in runtime
    assert res["runtimes"]["dense_fp32_torch"].startswith("pytorch eager")
    # the uncompressed model deployed as ours is: the runtime's share of the speed-up, and the same predictions
    assert res["runtimes"]["dense_fp32_ort"]["spinning"] == "off"
    assert abs(res["accuracy"]["dense_fp32_ort"] - res["accuracy"]["dense_fp32_torch"]) <= 0.01
    assert "dense_fp32_ort" in r.output
    dense = res["widths"]["dense"]
    # Torch-Pruning really removed channels; ours did too, unless ONNX Runtime alone met the 2x over PyTorch eager
    # (on this tiny model, at a moment the PyTorch reading was slow): then the allocation kept every channel, which
    # the timing decides, not the logic under test (its verdict, met or not, is checked against its numbers above)
    uncut = sum(res["widths"]["ours"].values()) == sum(dense.values())
    for side in ("torch_pruning",) if uncut else ("ours", "torch_pruning"):
        assert sum(res["widths"][side].values()) < sum(dense.values())
        assert res["macs_per_sample"][side] < res["macs_per_sample"]["dense"]
    assert len(res["torch_pruning"]["stages"]) == 2 and res["torch_pruning"]["train_steps"] == res["ours"]["train_steps"]
    assert teacher.is_file() and "vs Torch-Pruning" in r.output
    assert ("latency target" in r.output) and (("NOT met" in r.output) != target["met"])
    assert res["teacher"].startswith("trained here")


def test_a_target_the_narrowest_model_misses_is_refused_before_anything_trains(app, tmp_path):
    """bench --against trained the dense model, the allocation and both contenders (minutes), then printed "NOT met"
    for a target no width reaches; compress refuses such a target in seconds. (A 1000x speed-up: no timing is judged.)"""
    pytest.importorskip("torch_pruning")
    pytest.importorskip("onnxruntime")
    teacher = tmp_path / "teacher.safetensors"
    r = CliRunner().invoke(app, ["bench", "--against", "torch-pruning", "--model", "lenet5", "--data", "digits",
                                 "--teacher", str(teacher), "--speedup", "1000", "--train-limit", "256",
                                 "--select-images", "100"])
    words = " ".join(str(r.exception).split())
    assert r.exit_code != 0 and "--speedup 1000 (dense PyTorch" in words, r.output
    assert "cannot be met by removing channels: the narrowest model ours may deploy" in words and "before anything trained" in words
    assert "--drop-blocks and --strides do not apply" in words  # LeNet-5 has neither; the refusal advised both
    assert not teacher.exists()  # the dense model was not trained


def _resnet_against(app, tmp_path, drop_blocks: str, *extra: str) -> dict:
    """A tiny `bench --against` run of the small ResNet on digits with `--drop-blocks` (and `extra` options)."""
    pytest.importorskip("torch_pruning")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "against.json"
    args = ["bench", "--against", "torch-pruning", "--model", "resnet", "--data", "digits", "--teacher-epochs", "1",
            "--epochs", "1", "--tp-steps", "1", "--runs", "2", "--select-images", "100", "--train-limit", "128",
            "--speedup", "1000", "--drop-blocks", drop_blocks, "--json", str(out), "--workdir", str(tmp_path / "onnx"),
            *extra]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["workdir"] == str(tmp_path / "onnx") and (tmp_path / "onnx" / "ours_fp32.onnx").is_file()  # kept
    return res


def test_against_drops_the_named_block_from_ours_only(app, tmp_path):
    res = _resnet_against(app, tmp_path, "layer1")
    assert res["ours"]["dropped_blocks"] == ["layer1"] and res["config"]["drop_blocks"] == ["layer1"]
    assert not any(g.startswith("layer1.") for g in res["widths"]["ours"])  # the allocation is for the model without it
    assert "layer1.conv1" in res["widths"]["torch_pruning"]  # Torch-Pruning prunes channels only
    assert res["macs_per_sample"]["ours"] < res["macs_per_sample"]["torch_pruning"]


def test_against_auto_drop_allocates_with_and_without_the_block(app, tmp_path):
    res = _resnet_against(app, tmp_path, "auto")
    options = res["ours"]["drop_options"]
    assert [o["blocks"] for o in options] == [[], ["layer1"]] and all(o["predicted_loss"] is not None for o in options)
    assert res["ours"]["dropped_blocks"] in ([], ["layer1"]) and res["config"]["drop_blocks"] == ["auto"]


def test_against_raises_the_stem_stride_and_gives_torch_pruning_the_same_start(app, tmp_path):
    res = _resnet_against(app, tmp_path, "layer1", "--strides", "2", "--tp-start", "ours")
    assert res["ours"]["strides"] == {"stem": [2, 2]} and res["ours"]["dropped_blocks"] == ["layer1"]
    assert [(o["blocks"], o["stride"]) for o in res["ours"]["drop_options"]] == [(["layer1"], 2)]
    assert "stride 2" in res["torch_pruning_start"] and "layer1" in res["torch_pruning_start"]
    # both run on quarter-size maps: every conv after the stem sees 4x fewer positions than the dense model's
    assert res["macs_per_sample"]["torch_pruning"] < res["macs_per_sample"]["dense"] / 4
    assert "layer1.conv1" not in res["widths"]["torch_pruning"]  # it started without the block, as ours did
    import onnx

    strides = [a.ints for n in onnx.load(str(tmp_path / "onnx" / "ours_fp32.onnx")).graph.node if n.op_type == "Conv"
               for a in n.attribute if a.name == "strides"]
    assert list(strides[0]) == [2, 2]  # the deployed model downsamples at its stem


def test_the_allocator_tries_each_stride_with_each_block_set_and_resolves_the_config(monkeypatch):
    import torch

    from jointcompress.deploy import against
    from jointcompress.latency_targets import LatencyAllocation
    from jointcompress.models import build_model
    from jointcompress.width_importance import LossImportance

    tried = []

    def fake_allocate_for(teacher, split, example, work, target_ms, cfg):  # stride 2 without layer1: met, least loss
        tried.append((cfg.drop_blocks, cfg.strides))
        loss = {((), 1): 0.2, ((), 2): 0.3, (("layer1",), 1): 0.5, (("layer1",), 2): 0.6}
        met = cfg.strides == [2]
        curve = {"g": {8: 0.0}}
        alloc = LatencyAllocation({"g": 8}, {"g": 8}, 1.0, 1.0, 1.0 if met else 2.0)
        return alloc, LossImportance(curve, loss[(tuple(cfg.drop_blocks), cfg.strides[0])], curve)

    monkeypatch.setattr(against, "allocate_for", fake_allocate_for)
    cfg = against.AgainstConfig(drop_blocks=["auto"], strides=[1, 2])
    resolved, alloc, options = against.allocate(build_model("resnet"), None, torch.randn(2, 1, 28, 28), None, 1.0, cfg)
    assert tried == [([], [1]), ([], [2]), (["layer1"], [1]), (["layer1"], [2])]
    assert [(o["blocks"], o["stride"], o["met"]) for o in options] == [
        ([], 1, False), ([], 2, True), (["layer1"], 1, False), (["layer1"], 2, True)]
    assert resolved.drop_blocks == [] and resolved.strides == [2] and against.stride_of(resolved) == 2
    assert {"type": "raise_stride", "layer": None, "stride": 2} in against.our_recipe(alloc, resolved)["techniques"]
    assert not any(t["type"] == "raise_stride" for t in against.our_recipe(alloc, against.AgainstConfig())["techniques"])
    with pytest.raises(Exception, match="resolve it first"):
        against.stride_of(cfg)


def test_auto_drop_keeps_the_option_predicted_to_lose_least_among_those_that_met_the_target():
    import torch

    from jointcompress.deploy.against import AgainstConfig, choose_drop, drop_options, predicted_loss
    from jointcompress.latency_targets import LatencyAllocation
    from jointcompress.models import build_model
    from jointcompress.width_importance import LossImportance

    x = torch.randn(2, 1, 28, 28)
    assert drop_options(build_model("resnet"), x, AgainstConfig(drop_blocks=["auto"])) == [[], ["layer1"]]
    assert drop_options(build_model("resnet"), x, AgainstConfig(drop_blocks=["layer1"])) == [["layer1"]]
    assert drop_options(build_model("resnet"), x, AgainstConfig()) == [[]]
    curve = {"a": {4: 0.9, 8: 0.5, 16: 0.2}}
    imp = LossImportance(curve, 0.2, curve)
    alloc = LatencyAllocation({"a": 8}, {"a": 16}, 1.0, 1.0)
    assert predicted_loss(imp, alloc) == pytest.approx(0.5)  # 0.2 + the rise from 16 to 8 channels
    keep, drop, slow = ({"blocks": [], "met": True, "measured_ms": 1.0, "predicted_loss": 0.3},
                        {"blocks": ["layer1"], "met": True, "measured_ms": 0.5, "predicted_loss": 0.4},
                        {"blocks": [], "met": False, "measured_ms": 2.0, "predicted_loss": 0.1})
    assert choose_drop([keep, drop, slow]) is keep  # both met: the lower predicted loss
    assert choose_drop([{**keep, "met": False}, drop]) is drop  # only the drop met the target
    assert choose_drop([{**keep, "met": False}, {**drop, "met": False}])["blocks"] == ["layer1"]  # none met: the fastest


def test_against_without_torch_pruning_is_a_clear_error(app, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails as if not installed
    r = CliRunner().invoke(app, ["bench", "--against", "torch-pruning", "--model", "lenet5", "--data", "digits"])
    assert r.exit_code != 0
    assert "pip install torch-pruning" in str(r.exception)


@pytest.mark.parametrize("argv, words", [
    (["--against", "nncf", "--model", "lenet5"], "--against 'nncf' is unknown"),
    (["--against", "torch-pruning", "--model", "vgg"], "--model 'vgg' is not supported"),
    (["--against", "torch-pruning"], "needs --model"),
    (["--against", "torch-pruning", "--model", "resnet", "--teacher-epochs", "1", "--drop-blocks", "layer2"],
     "cannot drop 'layer2'"),
    ([], "needs ARTIFACT_DIR"),
    (["--against", "torch-pruning", "--model", "resnet", "--strides", "1,x"], "--strides '1,x'"),
    (["--against", "torch-pruning", "--model", "resnet", "--teacher-epochs", "1", "--strides", "1,9"],
     "strides: [1, 9] must list strides from 1"),
    (["--against", "torch-pruning", "--model", "resnet", "--teacher-epochs", "1", "--tp-start", "both"],
     "tp_start: 'both' is unknown"),
    (["--against", "torch-pruning", "--model", "lenet5", "--teacher-epochs", "1", "--strides", "2"],
     "a flatten into a Linear"),
    # failed after the dense model trained and was timed (a pydantic traceback), or were ignored without a word
    (["--against", "torch-pruning", "--model", "lenet5", "--target-ms", "0"], "target_ms (--target-ms) 0.0: give"),
    (["--against", "torch-pruning", "--model", "resnet", "--stride-layer", "fc"],
     "stride_layer (--stride-layer) 'fc' is read only with a stride above 1"),
    (["--against", "torch-pruning", "--model", "lenet5", "--teacher-epochs", "1", "--min-width", "1000"],
     "min_width (--min-width) 1000: the widest channel group has"),
])
def test_against_bad_input(app, argv, words):
    pytest.importorskip("torch_pruning")
    r = CliRunner().invoke(app, ["bench", *argv, "--data", "digits"])
    assert r.exit_code != 0 and words in str(r.exception)


def test_a_selection_capped_at_a_tenth_of_the_rows_is_said(app):
    """--select-images 500 of 600 rows held out 60, and the console said nothing (only the JSON's selected_on)."""
    from jointcompress.data import load_digits
    from jointcompress.deploy.against import AgainstConfig, matching_split

    split = load_digits()
    split.x_train, split.y_train = split.x_train[:600], split.y_train[:600]
    with pytest.warns(UserWarning, match=r"--select-images 500: 60 held out, a tenth of the 600 training images"):
        assert len(matching_split(split, AgainstConfig(model="lenet5", select_images=500)).y_val) == 60


def test_the_capped_selection_is_said_once_and_the_teacher_trains_on_the_comparisons_rows(monkeypatch):
    """The cap was said twice: the split was held out once for the teacher and again for the comparison."""
    pytest.importorskip("torch_pruning")
    import warnings

    import jointcompress.deploy.against as against

    seen = {}

    def dense_teacher(cfg, split, path):
        seen["teacher"] = split
        return None, "given"

    def run_against(cfg, split, dense, note, workdir):
        seen["run"] = split
        return {}

    monkeypatch.setattr(against, "dense_teacher", dense_teacher)
    monkeypatch.setattr(against, "run_against", run_against)
    monkeypatch.setattr(against, "check_before_training", lambda cfg, split, model: None)  # its timing: not the subject
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        bench_cmd.run_against_cli("torch-pruning", "lenet5", "digits", None,
                                  {"select_images": 5000, "train_limit": 600})
    capped = [w for w in said if "--select-images 5000: 60 held out" in str(w.message)]
    assert len(capped) == 1 and seen["teacher"] is seen["run"] and len(seen["run"].y_val) == 60


@pytest.mark.parametrize("argv, words", [
    (["ART", "--against", "torch-pruning", "--model", "lenet5"], "it does not read ARTIFACT_DIR (ART)"),
    (["ART", "--speedup", "5", "--teacher", "missing.safetensors"],
     "--teacher, --speedup: read only by bench --against torch-pruning"),
    (["ART", "--epochs", "3"], "--epochs: read only by bench --against torch-pruning; a bench of ART measures"),
])
def test_options_of_the_other_mode_of_bench_are_refused_by_name(app, argv, words):
    """--against with an artifact folder trained a new comparison and never read the folder; a plain bench given
    --speedup, --epochs or --teacher (a file that did not exist) measured the artifact without a word of them."""
    r = CliRunner().invoke(app, ["bench", *argv])
    assert r.exit_code != 0 and words in " ".join(str(r.exception).split()), r.output


def test_a_builder_the_default_digits_do_not_fit_names_data(app, tmp_path):
    """Without --data the embedded digits were read, and the builder's shape error did not say so."""
    pytest.importorskip("torch_pruning")
    builder = tmp_path / "net.py"
    builder.write_text("import torch.nn as nn\n\n\ndef build():\n"
                       "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(5))\n")
    r = CliRunner().invoke(app, ["bench", "--against", "torch-pruning", "--model", f"{builder}:build",
                                 "--teacher-epochs", "1"])
    assert r.exit_code != 0 and "'digits' is the embedded 8x8 digits" in str(r.exception), r.exception


def test_unsupported_model_is_a_clear_error():
    import torch

    from jointcompress.deploy.against import check_supported
    from jointcompress.errors import UnsupportedModelError

    class NoChannels(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10]

    with pytest.raises(UnsupportedModelError, match="no prunable channel group"):
        check_supported(NoChannels(), torch.randn(2, 1, 8, 8))


def test_bound_predict_matches_session_run_and_rebinds(tmp_path):
    pytest.importorskip("onnxruntime")
    import torch

    from jointcompress.deploy.onnx_export import bound_predict, export_onnx, ort_predict, ort_session

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3)).eval()
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 1, 8, 8))
    plain, bound = ort_predict(ort_session(path)), bound_predict(ort_session(path))
    a, b = torch.randn(5, 1, 8, 8), torch.randn(2, 1, 8, 8)
    first = bound(a).clone()
    assert torch.allclose(first, plain(a), atol=1e-6) and torch.allclose(first, model(a), atol=1e-5)
    assert torch.allclose(bound(b), plain(b), atol=1e-6) and bound(b).shape == (2, 3)  # another input: rebound
    a.mul_(2)  # the same buffer with new values: the binding reads them
    assert torch.allclose(bound(a), plain(a), atol=1e-6) and not torch.allclose(bound(a), first)
    wide = torch.randn(8, 2, 8, 8)[:, :1]  # not contiguous: copied, still right
    assert torch.allclose(bound(wide), model(wide), atol=1e-5)


def test_bound_runner_calls_the_compiled_session_and_falls_back(tmp_path):
    """The runner skips the Python wrapper's per-call work (here the wrapper is broken on
    purpose, and the runner still gives the model's logits), and uses the public call when the
    session does not expose its compiled one."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime as ort
    import torch

    from jointcompress.deploy.onnx_export import bound_runner, export_onnx, ort_session

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)).eval()
    session = ort_session(export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 1, 8, 8)))
    x, out = torch.randn(4, 1, 8, 8), np.zeros((4, 3), np.float32)
    binding = session.io_binding()
    binding.bind_ortvalue_input("input", ort.OrtValue.ortvalue_from_numpy(x.numpy()))
    binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(out))
    run = bound_runner(session, binding)
    if getattr(binding, "_session", None) is not None:  # ONNX Runtime that records a binding's session (1.20 did not)
        session.run_with_iobinding = lambda *a: (_ for _ in ()).throw(AssertionError("the wrapper was called"))
    run()  # else the runner cannot tell whose binding it is, and takes the public call
    assert np.allclose(out, model(x).detach().numpy(), atol=1e-5)

    class Public:  # a session without a compiled handle: the public call
        calls = 0

        def run_with_iobinding(self, b):
            Public.calls += 1

    bound_runner(Public(), binding)()
    assert Public.calls == 1


def test_the_console_says_when_torch_pruning_did_not_match_and_which_timings_are_flagged():
    """Both were in the JSON only: a table whose Torch-Pruning rows were less accurate than ours read as an
    equal-accuracy comparison, and flagged medians (a busy machine) went unsaid."""
    from jointcompress.commands.bench_cmd import against_notes

    result = {"match": {"ours_selection_accuracy": 0.985, "torch_pruning_matched": False},
              "torch_pruning": {"candidates": [{"selection_accuracy_full_budget": 0.97}]},
              "timing": {"batch1": {"flagged": ["tp_int8_ort"]}, "batch64": {"flagged": []}}}
    notes = against_notes(result)
    assert "did not reach our accuracy" in notes[0] and "98.50%" in notes[0] and "97.00%" in notes[0]
    assert "tp_int8_ort (batch 1)" in notes[1]
    result["match"]["torch_pruning_matched"], result["timing"]["batch1"]["flagged"] = True, []
    assert against_notes(result) == []
    # ours collapsed (16% against a 95% dense model): a row like any other, and Torch-Pruning "matched" to it
    result.update(accuracy={"dense_fp32_torch": 0.9467, "ours_fp32_torch": 0.1633}, config={"epochs": 1})
    said = against_notes(result)
    assert len(said) == 1 and "ours lost 78.3 points of the dense model's accuracy" in said[0] and "1 epochs" in said[0]
    result["accuracy"]["ours_fp32_torch"] = 0.93
    assert against_notes(result) == []
    # a --speedup "met" by a model with every channel kept: its speed-up was the runtime's alone, unsaid
    result["widths"] = {"dense": {"conv1": 6, "conv2": 16}, "ours": {"conv1": 6, "conv2": 16}}
    said = against_notes(result)
    assert len(said) == 1 and "ours removed no channel" in said[0] and "dense_fp32_ort" in said[0]
    result["widths"]["ours"] = {"conv1": 4, "conv2": 8}
    assert against_notes(result) == []
    # a dense model loaded from --teacher may have trained on the selection images (compress --weights says so)
    result.update(teacher="loaded from runs/a/teacher.safetensors", selected_on="validation (2000 training images)")
    said = against_notes(result)
    assert len(said) == 1 and "loaded from runs/a/teacher.safetensors (--teacher)" in said[0] and "read high" in said[0]
    result["teacher"] = "trained here for 4 epochs"
    assert against_notes(result) == []


def test_a_teacher_path_that_is_a_folder_is_refused_before_any_training(tmp_path, monkeypatch):
    """`--teacher DIR` trained the dense model for --teacher-epochs, then failed to write it (naming a temporary
    path the user never gave) and left the temporary file behind."""
    from jointcompress import JointCompressError
    from jointcompress.data import load_digits
    from jointcompress.deploy import against

    monkeypatch.setattr("jointcompress.pipeline.train_teacher", lambda *a, **k: pytest.fail("trained first"))
    with pytest.raises(JointCompressError, match="--teacher .*: a folder; give the dense model's weights file"):
        against.dense_teacher(against.AgainstConfig(model="lenet5"), load_digits(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def _timing(ours64: float, ours1: float, inter64: float) -> dict:
    return {"batch64": {"alone_ms": {"dense_fp32_torch": 10.0, "ours_fp32_ort": ours64},
                        "latency_ms": {"dense_fp32_torch": 11.0, "ours_fp32_ort": inter64}},
            "batch1": {"alone_ms": {"dense_fp32_torch": 0.5, "ours_fp32_ort": ours1},
                       "latency_ms": {"dense_fp32_torch": 0.6, "ours_fp32_ort": ours1}}}


def test_the_verdict_checks_the_deployed_model_not_only_the_probe_before_training():
    """`bench --against` said "met" from the allocation's probe while its own table read the trained model over
    the target (7.615 ms target "met", ours_fp32_ort 8.152 ms interleaved, 7.833 alone)."""
    from jointcompress.commands.bench_cmd import target_note
    from jointcompress.deploy.against import deployed_against_target

    over = deployed_against_target(_timing(7.833, 0.2, 8.152), 7.615, both_batches=False)
    assert over == {"deployed_ms": 7.833, "deployed_interleaved_ms_b64": 8.152, "deployed_goal_ms": 7.615,
                    "deployed_met": False}
    probe = {"latency_ms_b64": 7.615, "met": True, "measured_ms": 6.64, "measured_as": "least of 3 alone medians"}
    note = target_note({**probe, **over})
    assert "allocation met" in note and "OVER the target" in note and "7.833 ms alone" in note and "re-time" in note
    # with both batches, batch 1 counts at dense's batch-64 / batch-1 ratio (20x here): 0.4 ms -> 8 ms
    both = deployed_against_target(_timing(5.0, 0.4, 5.5), 7.615, both_batches=True)
    assert both["deployed_ms"] == pytest.approx(8.0) and not both["deployed_met"]
    under = deployed_against_target(_timing(5.0, 0.2, 5.5), 7.615, both_batches=True)
    assert under["deployed_met"] and "under the target" in target_note({**probe, **under})


def test_a_speedup_target_is_judged_against_dense_pytorch_of_the_same_timing_run():
    """The goal of `--speedup 4` was fixed from dense PyTorch timed once at allocation (61.7 / 4 = 15.43 ms): when
    dense read slower in the timing run, the table printed 4.1x beside "OVER the target"."""
    from jointcompress.commands.bench_cmd import target_note
    from jointcompress.deploy.against import deployed_against_target

    timing = _timing(2.4, 0.1, 2.5)  # dense PyTorch 10 ms alone in this run: 4.17x at batch 64
    fixed = deployed_against_target(timing, 2.0, both_batches=False)  # the allocation's goal, dense read 8 ms then
    assert not fixed["deployed_met"]
    same_run = deployed_against_target(timing, 2.0, both_batches=False, speedup=4.0)
    assert same_run["deployed_goal_ms"] == pytest.approx(2.5) and same_run["deployed_met"]
    probe = {"latency_ms_b64": 2.0, "speedup": 4.0, "met": True, "measured_ms": 1.9, "measured_as": "alone medians"}
    assert "under the target of 2.500 ms there (dense PyTorch in that run / 4)" in target_note({**probe, **same_run})


def test_the_matching_reads_held_out_training_images_never_test_ones():
    import torch

    from jointcompress.data import load_digits
    from jointcompress.deploy.against import AgainstConfig, matching_split, selection_split
    from jointcompress.errors import JointCompressError

    split = load_digits()
    held = matching_split(split, AgainstConfig(select_images=100))
    sel = selection_split(held)
    assert len(sel.x_test) == 100 and len(held.x_train) == len(split.x_train) - 100
    rows = {tuple(r.flatten().tolist()) for r in split.x_train}
    kept = {tuple(r.flatten().tolist()) for r in held.x_train}
    chosen_on = [tuple(r.flatten().tolist()) for r in sel.x_test]
    assert all(r in rows and r not in kept for r in chosen_on)  # training images nobody trains on
    assert torch.equal(held.x_test, split.x_test)  # the test split is whole, for the reported accuracy
    assert matching_split(held, AgainstConfig(select_images=100)) is held  # the teacher's and the run's: the same rows
    small = matching_split(split, AgainstConfig(select_images=10**6))  # at most a tenth of the rows
    assert len(small.x_val) == len(split.x_train) // 10
    tiny = dataclasses.replace(split, x_train=split.x_train[:9], y_train=split.y_train[:9])
    with pytest.raises(JointCompressError, match="at least 10"):
        matching_split(tiny, AgainstConfig())


def test_torch_pruning_keeps_the_classifier_found_by_the_graph_not_the_last_registered_layer():
    """A model that defines its head first: the last registered conv was kept whole (Torch-Pruning handicapped
    in the comparison) and the head pruned to 5 of 10 classes."""
    from types import SimpleNamespace

    import torch
    import torch.nn as nn

    from jointcompress.deploy.against_tp import pruner_for

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 10)
            self.c1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.c2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU())

        def forward(self, x):
            return self.fc(self.c2(self.c1(x)).mean((2, 3)))

    torch.manual_seed(0)
    model, x = HeadFirst().eval(), torch.randn(1, 1, 16, 16)
    pruner_for(model, x, SimpleNamespace(tp_max_ratio=0.5, tp_steps=1, tp_round_to=0, tp_global=False)).step()
    with torch.no_grad():
        assert model(x).shape[-1] == 10
    assert model.c2[0].out_channels == 16 and model.c1[0].out_channels == 8


def test_a_torch_pruning_stage_that_removed_no_channel_is_said_and_marked(monkeypatch, tmp_path):
    """round_to 8 on 16-channel layers kept every channel at some ratios: the stage was labelled by its ratio and
    matched against as if pruned."""
    from types import SimpleNamespace

    import torch
    import torch.nn as nn

    from jointcompress.deploy import against_tp
    from jointcompress.deploy.against import AgainstConfig

    for name in ("fine_tune", "ort_fp32", "accuracy_of"):
        monkeypatch.setattr(against_tp, name, lambda *a, **k: 0.0)
    monkeypatch.setattr(against_tp, "alone_ms", lambda *a, **k: 1.0)
    monkeypatch.setattr(against_tp, "selection_split", lambda split: split)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.randn(4, 1, 8, 8)
    split = SimpleNamespace(x_test=x, y_test=torch.zeros(4, dtype=torch.long))
    cfg = AgainstConfig(tp_max_ratio=0.5, tp_steps=4, tp_round_to=8)
    with pytest.warns(UserWarning, match=r"Torch-Pruning's step \d \(ratio .*\) removed no channel"):
        stages = against_tp.stage_curve(model, split, x[:1], tmp_path, cfg, budget=4)
    assert [s["pruned"] for s in stages].count(False) >= 1 and any(s["pruned"] for s in stages)

"""`jointcompress demo`: both size rows land on the target, and the fast row really is smaller and int8."""
import json

from typer.testing import CliRunner

from jointcompress.cli import app


def test_demo_compares_both_modes_and_builds_a_fast_model(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--teacher-epochs", "2", "--epochs", "3", "--ratio", "20"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    for mode in ("sequential", "joint"):
        manifest = json.loads((out / mode / "manifest.json").read_text())
        file_bytes = (out / mode / manifest["weights_file"]).stat().st_size
        assert rows[mode]["file_bytes"] == file_bytes
        assert abs(file_bytes / data["target_bytes"] - 1) <= 0.02
    fast = rows["structured int8"]
    # channels were physically removed: every hidden layer is narrower, the output layer is not
    dense, kept = fast["dense_channels"], fast["channels"]
    hidden = [n for n in dense if n != list(dense)[-1]]
    assert all(kept[n] < dense[n] for n in hidden) and kept[list(dense)[-1]] == dense[list(dense)[-1]]
    assert fast["params"] < 0.25 * rows["uncompressed"]["params"]
    assert fast["bits"] == "int8" and 0.0 < fast["accuracy"] <= 1.0
    assert (out / "structured" / "manifest.json").is_file() and (out / "structured-int8" / "model_int8.onnx").is_file()
    for name in ("uncompressed", "sequential", "joint", "structured int8"):
        assert rows[name]["latency_ms_b1"] > 0 and rows[name]["latency_ms_b64"] > 0
        assert rows[name]["latency_threads"] == 1
    assert "target 20x" in res.output and "structured int8" in res.output
    # every kept epoch was chosen on training images held out, not on the test images the table reports
    assert data["recipe"]["training"]["validation_images"] == 150
    assert all(rows[m]["selected_on"] == "validation (150 training images held out)" for m in ("sequential", "joint"))


def test_demo_refuses_an_unknown_model(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--model", "resnet"])
    assert res.exit_code != 0 and "--model" in str(res.exception) + res.output


def test_demo_writes_over_its_own_output_only(tmp_path):
    """`demo --out DIR` wrote into any folder (--force was on by default), over the user's files."""
    from jointcompress.cli import _earlier_demo

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"mine": 1}')
    (mine / "notes.txt").write_text("mine")
    res = CliRunner().invoke(app, ["demo", "--out", str(mine)])
    assert res.exit_code != 0 and "already exists and is not empty" in str(res.exception) + res.output
    assert (mine / "results.json").read_text() == '{"mine": 1}'
    (mine / "notes.txt").unlink()
    (mine / "joint").mkdir()  # what a demo stopped halfway leaves: written over, as `make demo` run again does
    assert _earlier_demo(mine) and not _earlier_demo(tmp_path / "absent")
    for name in ("report.html", "layers.csv", "layers.json"):  # `jointcompress report` on the demo's folder
        (mine / name).write_text("")
    assert _earlier_demo(mine)


def test_an_unreachable_demo_target_names_the_ratio_option(tmp_path, monkeypatch):
    """lenet300 at the default 100x: the message named target.size_kb and min_keep, which the demo has not."""
    import jointcompress.demo
    from jointcompress.targets import TargetError

    def unreachable(*args, **kwargs):
        raise TargetError("target: 2.0 KiB cannot be reached; raise target.size_kb")

    monkeypatch.setattr(jointcompress.demo, "run_demo", unreachable)
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--model", "lenet300"])
    assert res.exit_code != 0 and "its target is --ratio 100; ask for a lower --ratio" in str(res.exception) + res.output


def test_a_demo_ratio_out_of_reach_is_refused_before_the_teacher_trains_and_leaves_no_folder(tmp_path, monkeypatch):
    """`demo --ratio 5000` trained the teacher first and then refused the target (whose floor depends on the
    architecture only), leaving an empty --out behind; it is refused on the untrained model, and the folder it
    made goes again. A folder that was there before stays."""
    import jointcompress.demo

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher trained before the target was checked")

    monkeypatch.setattr(jointcompress.demo, "train_teacher", no_teacher)
    out = tmp_path / "new" / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--ratio", "5000"])
    said = str(res.exception) + res.output
    assert res.exit_code != 0 and "smallest artifact" in said and "ask for a lower --ratio" in said, said
    assert not (tmp_path / "new").exists()
    there = tmp_path / "there"
    there.mkdir()
    res = CliRunner().invoke(app, ["demo", "--out", str(there), "--ratio", "5000"])
    assert res.exit_code != 0 and there.is_dir()

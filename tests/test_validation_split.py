"""training.validation_images: the kept epoch (and a teacher's best epoch) is chosen on training rows held
out for it, and the test split is only reported on."""
import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from jointcompress import pipeline
from jointcompress.cli import app
from jointcompress.data import DataError, accuracy, hold_out, load_digits
from jointcompress.recipe import parse_recipe


def _rows(x: torch.Tensor) -> set:
    return {tuple(r) for r in x.flatten(1).tolist()}


def test_hold_out_moves_that_many_training_rows_the_same_draw_every_time():
    split = load_digits()
    held = hold_out(split, 150)
    assert (len(held.y_val), len(held.y_train)) == (150, len(split.y_train) - 150)
    # every training row is in exactly one of the two parts; the test split is untouched
    both = torch.cat([held.x_train, held.x_val])
    assert sorted(map(tuple, both.flatten(1).tolist())) == sorted(map(tuple, split.x_train.flatten(1).tolist()))
    assert torch.equal(held.x_test, split.x_test) and torch.equal(held.y_test, split.y_test)
    again = hold_out(split, 150)  # paired runs (every seed, every variant) hold out the same rows
    assert torch.equal(again.x_val, held.x_val) and torch.equal(again.y_train, held.y_train)
    assert held.selection()[0] is held.x_val and split.selection()[0] is split.x_test
    assert hold_out(split, 0) is split and hold_out(held, 150) is held  # nothing to do / held out already
    assert "150" in held.selected_on and split.selected_on == "test"


def test_hold_out_of_every_training_row_is_refused_naming_the_field():
    split = load_digits()
    with pytest.raises(DataError, match="training.validation_images"):
        hold_out(split, len(split.y_train))
    with pytest.raises(DataError, match="already holds 150 training images out"):  # a count the split does not have
        hold_out(hold_out(split, 150), 50)


def test_compress_and_save_holds_out_the_recipes_rows_from_a_split_given_whole(tmp_path):
    split = load_digits()
    recipe = parse_recipe({"model": "lenet300", "techniques": [{"type": "quant_lsq", "bits": 8}],
                           "training": {"epochs": 1, "batch_size": 128, "validation_images": 120}})
    teacher = pipeline.train_teacher("lenet300", split, epochs=1)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        outcome = pipeline.compress_and_save("artifact", teacher, recipe, split,
                                             pipeline.builder_for("lenet300", split), tmp_path)
    assert outcome.row["selected_on"] == hold_out(split, 120).selected_on  # what the manifest's recipe says
    assert not [w for w in said if "is not read by compress()" in str(w.message)]  # it held them out


def test_compress_in_python_says_it_does_not_read_validation_images():
    """compress() trains on what it is given and keeps the epoch the caller's evaluate rates best: a recipe's
    validation_images held nothing out there, without a word; now it is said, with the way to hold them out."""
    from jointcompress.api import compress, validation_held_out
    from jointcompress.data import evaluator

    split = load_digits()
    recipe = {"model": "lenet300", "techniques": [{"type": "quant_lsq", "bits": 8}],
              "training": {"epochs": 1, "batch_size": 256, "validation_images": 120}}
    model = pipeline.builder_for("lenet300", split)()
    with pytest.warns(UserWarning, match=r"training.validation_images: 120 is not read by compress\(\).*hold_out"):
        compress(model, recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning at all with 0, nor from a caller that held them out
        recipe["training"]["validation_images"] = 0
        compress(pipeline.builder_for("lenet300", split)(), recipe, (split.x_train, split.y_train),
                 evaluator(split.x_test, split.y_test))
        recipe["training"]["validation_images"] = 120
        with validation_held_out():
            compress(pipeline.builder_for("lenet300", split)(), recipe, (split.x_train, split.y_train),
                     evaluator(split.x_test, split.y_test))


def test_prepare_says_it_does_not_read_validation_images():
    """prepare() leaves data and evaluation to the caller's loop: a recipe's validation_images held nothing out
    there either; it is said once, with the way to hold them out, and not for 0."""
    from jointcompress import prepare

    split = load_digits()
    recipe = {"model": "lenet300", "techniques": [{"type": "quant_lsq", "bits": 8}],
              "training": {"epochs": 1, "batch_size": 256, "validation_images": 120}}
    with pytest.warns(UserWarning, match=r"validation_images: 120 is not read by prepare\(\): your loop.*hold_out"):
        prepare(pipeline.builder_for("lenet300", split)(), recipe, total_steps=4)
    recipe["training"]["validation_images"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        prepare(pipeline.builder_for("lenet300", split)(), recipe, total_steps=4)


def test_compress_and_save_chooses_on_the_validation_rows_and_reports_the_test_split(tmp_path, monkeypatch):
    split = hold_out(load_digits(), 200)
    read = []
    real = pipeline.evaluator

    def recording(x, y):
        evaluate = real(x, y)

        def wrapped(model):
            read.append(x)
            return evaluate(model)
        return wrapped

    monkeypatch.setattr(pipeline, "evaluator", recording)
    recipe = parse_recipe({"model": "lenet300", "techniques": [{"type": "quant_lsq", "bits": 8}],
                           "training": {"epochs": 3, "batch_size": 64, "validation_images": 200}})
    teacher = pipeline.train_teacher("lenet300", split, epochs=1)
    assert read and all(x is split.x_val for x in read)  # the teacher chose its epoch on them too
    read.clear()
    outcome = pipeline.compress_and_save("artifact", teacher, recipe, split, pipeline.builder_for("lenet300", split),
                                         tmp_path)
    during = [x for x in read[:3]]  # one evaluation per epoch, then finalize_and_save's
    assert all(x is split.x_val for x in during) and any(x is split.x_test for x in read[3:])
    history = outcome.result.history
    on_val = [e["metrics"]["accuracy"] for e in history.epochs]
    assert on_val[history.best_epoch - 1] == max(on_val)  # the kept epoch is the validation's best
    assert outcome.row["accuracy"] == accuracy(outcome.model, split.x_test, split.y_test)
    assert outcome.row["selected_on"] == split.selected_on


def test_compare_holds_the_rows_out_once_for_every_teacher_and_variant(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ntechniques:\n"
                      "  - {type: prune_unstructured, sparsity: 0.5}\n  - {type: quant_lsq, bits: 8, start: 0.3}\n"
                      "training: {epochs: 1, batch_size: 128}\n")
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["compare", str(recipe), "--ratios", "8", "--seeds", "1", "--teacher-epochs", "1",
                                   "--variants", "sequential", "--val-images", "120", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "compare.json").read_text())
    assert result["train_images"] == len(load_digits().y_train) - 120
    assert result["selected_on"] == hold_out(load_digits(), 120).selected_on
    manifest = json.loads((out / result["runs"][0]["dir"] / "artifact" / "manifest.json").read_text())
    assert manifest["recipe"]["training"]["validation_images"] == 120
    assert result["runs"][0]["selected_on"] == result["selected_on"]  # each run says what chose its epoch
    assert "chosen on validation (120 training images held out)" in " ".join(res.output.split())


def test_an_hf_recipe_chooses_its_kept_epoch_on_held_out_training_rows(tmp_path, monkeypatch):
    """training.validation_images in an hf recipe: rows of the training file held out, every evaluation
    during training reads them, and the dev file is only reported on."""
    pytest.importorskip("transformers")
    import yaml
    from hf_helpers import sst2_folder, teacher_folder
    from typer.testing import CliRunner

    from jointcompress.cli import app
    from jointcompress.hf import recipe_steps
    from jointcompress.hf.wrapper import accuracy as hf_accuracy

    teacher_dir, data = teacher_folder(tmp_path, heads=4, ffn=64), sst2_folder(tmp_path, seed=0)
    rec = {"name": "hf-held-out", "hf": {"student_layers": [0], "max_length": 16},
           "training": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "seed": 0, "validation_images": 7},
           "techniques": [{"type": "quant_lsq", "bits": 8, "targets": ["*encoder.layer.*"]},
                          {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]}
    path, out = tmp_path / "r.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(rec))
    read = []  # the rows of every accuracy the run measures, in order

    def counting(model, x, y, *a, **k):
        read.append(len(y))
        return hf_accuracy(model, x, y, *a, **k)

    monkeypatch.setattr(recipe_steps, "accuracy", counting)
    args = ["compress", str(path), "--data", str(data), "--weights", str(teacher_dir), "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_rows"] == 32 - 7 and summary["dev_rows"] == 8
    assert summary["selected_on"] == "validation (7 training rows held out)"
    # the teacher on dev (8 rows), every evaluation of the run (one per epoch, its end) on the 7 held-out
    # rows, then the finalized student, the artifact and the rest on dev
    during = read[1:read.index(8, 1)]
    assert read[0] == 8 and len(during) >= 2 and set(during) == {7} and set(read[1 + len(during):]) == {8}, read
    rec["training"]["validation_images"] = 32
    path.write_text(yaml.safe_dump(rec))
    res = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "out2")])
    assert res.exit_code != 0 and "training.validation_images: 32 of the 32 training rows" in str(res.exception)


def test_a_resumed_run_that_trained_its_model_refuses_another_hold_out(tmp_path):
    """Killed before its first checkpoint, a run resumed with another count reused a model trained on rows
    now held out to choose on (start.json recorded only the weights)."""
    import shutil

    out = tmp_path / "run"

    def recipe(images: int) -> str:
        path = tmp_path / f"r{images}.yaml"
        path.write_text("model: lenet300\ndata: digits\ntechniques:\n  - {type: quant_lsq, bits: 8}\n"
                        f"training: {{epochs: 1, batch_size: 128, validation_images: {images}}}\n")
        return str(path)

    first = CliRunner().invoke(app, ["compress", recipe(50), "--teacher-epochs", "1", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "chosen on validation (50 training images held out)" in " ".join(first.output.split())
    for path in out.iterdir():  # as if killed after the model trained, before any checkpoint
        if path.name not in ("teacher.safetensors", "start.json"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (out / "checkpoints").mkdir()
    again = CliRunner().invoke(app, ["compress", recipe(100), "--teacher-epochs", "1", "--out", str(out), "--resume"])
    assert again.exit_code != 0 and "training.validation_images: 50" in str(again.exception)
    kept = (out / "teacher.safetensors").read_bytes()
    (out / "teacher.safetensors").unlink()  # its model lost too: refused before training one again
    again = CliRunner().invoke(app, ["compress", recipe(100), "--teacher-epochs", "1", "--out", str(out), "--resume"])
    assert again.exit_code != 0 and "training.validation_images: 50" in str(again.exception)
    assert not (out / "teacher.safetensors").exists()
    (out / "teacher.safetensors").write_bytes(kept)
    longer = CliRunner().invoke(app, ["compress", recipe(50), "--teacher-epochs", "3", "--out", str(out), "--resume"])
    assert longer.exit_code != 0 and "trained its model for --teacher-epochs 1, and this command asks for 3" in " ".join(
        str(longer.exception).split())  # it reused the 1-epoch model without a word
    same = CliRunner().invoke(app, ["compress", recipe(50), "--teacher-epochs", "1", "--out", str(out), "--resume"])
    assert same.exit_code == 0, same.output  # the count it trained with resumes


def test_compare_refuses_a_hold_out_of_every_image_by_its_option_before_making_the_folder(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ntechniques:\n  - {type: quant_lsq, bits: 8}\n")
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["compare", str(recipe), "--ratios", "8", "--variants", "sequential",
                                   "--val-images", str(len(load_digits().y_train)), "--out", str(out)])
    assert res.exit_code != 0 and str(res.exception).startswith("--val-images") and not out.exists()


def test_the_sensitivity_scan_records_the_images_it_measured_on(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ntraining: {validation_images: 150}\n")
    out = tmp_path / "sens"
    res = CliRunner().invoke(app, ["sensitivity", str(recipe), "--teacher-epochs", "1", "--sparsities", "0.5",
                                   "--bits", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "sensitivity.json").read_text())
    assert result["measured_on"] == hold_out(load_digits(), 150).selected_on

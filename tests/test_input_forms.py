"""The recipe's `inputs`: how a data file's values become the model's inputs, and the check of a model given with
--weights against them (data.INPUT_FORMS, pipeline.check_given_model_inputs)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from jointcompress.data import INPUT_FORMS, load_dataset, standardised


def _npz(tmp_path, x_train, y_train, x_test, y_test, name="d.npz"):
    path = tmp_path / name
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.mark.parametrize("shape", [(40, 6, 6, 3), (40, 6, 6), (40, 5)])  # colour NHWC, grayscale, a table
def test_each_input_form_is_what_it_says_and_its_record_rebuilds_it(tmp_path, shape):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=shape).astype(np.uint8)
    labels = np.arange(len(raw)) % 2
    path = _npz(tmp_path, raw[:30], labels[:30], raw[30:], labels[30:])
    as_model_takes = torch.from_numpy(raw[30:].astype(np.float32))
    if len(shape) == 4:
        as_model_takes = as_model_takes.permute(0, 3, 1, 2)
    elif len(shape) == 3:
        as_model_takes = as_model_takes.unsqueeze(1)
    for form in INPUT_FORMS:
        split = load_dataset(str(path), inputs=form)
        expected = {"unit_range": as_model_takes / 255, "as_stored": as_model_takes}.get(form)
        if expected is not None:
            assert torch.allclose(split.x_test, expected, atol=1e-6), form
        else:
            assert abs(float(split.x_train.mean())) < 1e-4  # standardised on the training split
        # the record (the manifest's input_standardisation) turns the file's values into the same inputs
        assert torch.allclose(standardised(raw[30:], split.standardisation), split.x_test, atol=1e-5), form


class _Threshold(nn.Module):
    """A model trained on the file's values as stored: class 1 where the mean pixel is over 127.5."""

    def forward(self, x):
        m = x.flatten(1).mean(1)
        return torch.stack([127.5 - m, m - 127.5], 1)


def _bright_and_dark(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.arange(200) % 2
    raw = np.where(labels[:, None, None] == 1, rng.integers(155, 256, (200, 8, 8)), rng.integers(0, 101, (200, 8, 8)))
    return _npz(tmp_path, raw[:100].astype(np.uint8), labels[:100], raw[100:].astype(np.uint8), labels[100:])


def test_a_given_model_near_chance_on_its_inputs_is_said_with_the_form_it_reads_best_on(tmp_path):
    """A teacher trained on other inputs than the standardised ones the CLI fed it read near chance, and the run
    trained and saved on it without a word."""
    from jointcompress.pipeline import check_given_model_inputs

    path = _bright_and_dark(tmp_path)
    split = load_dataset(str(path))
    with pytest.warns(UserWarning) as said:
        check_given_model_inputs(_Threshold(), split, str(path), "standardised", "teacher.safetensors")
    text = str(said[0].message)
    assert "--weights teacher.safetensors: the model reads 50.0%" in text and "near chance" in text
    assert "as_stored 100.0%" in text and "set `inputs: as_stored` in the recipe" in text
    with warnings.catch_warnings():  # fed as it was trained: nothing to say
        warnings.simplefilter("error")
        check_given_model_inputs(_Threshold(), load_dataset(str(path), inputs="as_stored"), str(path), "as_stored", "t")


def test_a_given_model_near_chance_on_every_form_asks_whether_it_is_this_data_s_model(tmp_path):
    from jointcompress.pipeline import check_given_model_inputs

    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, 0.0]]).expand(len(x), 2)

    path = _bright_and_dark(tmp_path)
    with pytest.warns(UserWarning, match="near chance on every form: are these the weights of this model"):
        check_given_model_inputs(Constant(), load_dataset(str(path)), str(path), "standardised", "t")


def test_inputs_is_refused_beside_an_hf_section():
    from jointcompress.errors import RecipeError
    from jointcompress.recipe import parse_recipe

    with pytest.raises(RecipeError, match="inputs: unit_range sets how an .npz's values become inputs"):
        parse_recipe({"inputs": "unit_range", "hf": {}})


def test_a_torch_save_file_given_as_data_is_named_so(tmp_path):
    from jointcompress.errors import DataError

    path = tmp_path / "data.pt"
    torch.save({"x_train": torch.zeros(2, 3)}, path)
    with pytest.raises(DataError, match="is a torch.save file .* numpy.savez"):
        load_dataset(str(path))


def test_the_command_line_says_so_for_weights_near_chance_and_records_the_form_it_fed(tmp_path, monkeypatch, capsys):
    """Wired into `compress --weights`: the warning before training; and `inputs: unit_range` trains on the digits'
    values / 16, which the artifact's manifest records for whoever feeds it next."""
    import json

    from safetensors.torch import save_file

    from cli_helpers import run_cli
    from jointcompress.models import LeNet300

    torch.manual_seed(0)
    save_file(LeNet300(64, 10).state_dict(), str(tmp_path / "w.safetensors"))  # untrained: chance on every form
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ninputs: unit_range\ntechniques: [{type: quant_lsq, bits: 8}]\n"
                      "training: {epochs: 1}\n")
    code, out = run_cli(monkeypatch, capsys, "compress", recipe, "--weights", tmp_path / "w.safetensors",
                        "--out", tmp_path / "out")
    assert code == 0 and "near chance on every form" in out and "`inputs: unit_range` feeds them" in out, out
    record = json.loads((tmp_path / "out" / "artifact" / "manifest.json").read_text())["extra"]["input_standardisation"]
    assert (record["per"], record["mean"], record["std"]) == ("all", [0.0], [16.0])


def test_the_line_a_run_prints_about_its_inputs_names_their_form(tmp_path):
    """Under `inputs: as_stored` the command line said the model takes (x - mean) / std with the training split's
    mean and std; the manifest (rightly) recorded mean 0, std 1, and a user who followed the line fed the model
    inputs it was not trained on."""
    from jointcompress.cli import _standardisation_line

    raw = np.random.default_rng(0).integers(0, 256, size=(40, 5)).astype(np.uint8)
    path = _npz(tmp_path, raw[:30], np.arange(30) % 2, raw[30:], np.arange(10) % 2)
    lines = {form: _standardisation_line(load_dataset(str(path), inputs=form), form) for form in INPUT_FORMS}
    assert "as stored (inputs: as_stored)" in lines["as_stored"] and "mean" not in lines["as_stored"]
    assert "values / 255 (inputs: unit_range)" in lines["unit_range"]
    assert "(x - mean) / std" in lines["standardised"] and "per feature (5 of each)" in lines["standardised"]

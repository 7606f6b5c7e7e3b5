"""Mistakes in an image .npz given as --data: each ends in one DataError naming the file, the array and the
fix (the CLI prints it and exits 2), never a numpy / zipfile traceback, a huge allocation or a silently
wrong accuracy."""
import sys
from pathlib import Path

import numpy as np
import pytest

from jointcompress.data import load_dataset
from jointcompress.errors import DataError

MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist" / "mnist.npz"


def _arrays(classes: int = 3):
    r = np.random.default_rng(0)
    return dict(x_train=r.integers(0, 255, (100, 8, 8)).astype(np.uint8), y_train=np.arange(100) % classes,
                x_test=r.integers(0, 255, (20, 8, 8)).astype(np.uint8), y_test=np.arange(20) % classes)


def _save(tmp_path, name="d.npz", **changes) -> Path:
    path = tmp_path / name
    np.savez(path, **{**_arrays(), **changes})
    return path


def _refused(path) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    return " ".join(str(info.value).split())


def test_a_npy_file_is_named_a_single_array_and_told_what_an_npz_holds(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, _arrays()["x_train"])  # was: TypeError, ndarray does not support the context manager protocol
    msg = _refused(path)
    assert "images.npy holds a single array" in msg and "(100, 8, 8)" in msg
    assert "x_train, y_train, x_test, y_test" in msg and "numpy.savez(path, x_train=" in msg


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped_byte", "truncated_compressed"])
def test_a_truncated_or_corrupted_npz_names_the_file(tmp_path, damage):
    good = tmp_path / "good.npz"
    (np.savez_compressed if damage.endswith("compressed") else np.savez)(good, **_arrays())
    data = bytearray(good.read_bytes())
    if damage.startswith("truncated"):  # an interrupted download or copy: was zipfile.BadZipFile
        data = data[:3000] if damage == "truncated" else data[:-30]
    elif damage == "empty":  # was EOFError
        data = b""
    else:  # was zipfile.BadZipFile: Bad CRC-32
        data[200] ^= 0xFF
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(data))
    msg = _refused(bad)
    assert "bad.npz is truncated or corrupted, or not an .npz archive" in msg and "numpy.savez(path" in msg


def test_an_npz_without_the_four_names_lists_what_it_lacks_and_holds(tmp_path):
    path = tmp_path / "positional.npz"
    a = _arrays()
    np.savez(path, a["x_train"], y_train=a["y_train"])
    msg = _refused(path)
    assert "lacks arrays x_train, x_test, y_test" in msg and "it holds" in msg and "arr_0" in msg


@pytest.mark.parametrize("key", ["x_train", "x_test"])
@pytest.mark.parametrize("kind", ["strings", "dates"])
def test_non_numeric_pixels_are_refused_by_dtype_naming_the_array(tmp_path, key, kind):
    shape = _arrays()[key].shape
    x = np.full(shape, "a") if kind == "strings" else np.zeros(shape, "datetime64[s]")
    msg = _refused(_save(tmp_path, **{key: x}))  # strings were: ValueError, could not convert string to float
    assert f"d.npz:{key} holds" in msg and str(x.dtype) in msg and "not numbers" in msg


def test_string_labels_are_refused_with_the_relabelling(tmp_path):
    msg = _refused(_save(tmp_path, y_train=np.array(["cat", "dog"] * 50)))
    assert "d.npz:y_train holds <U3 values" in msg and "numpy.unique(y, return_inverse=True)" in msg


@pytest.mark.parametrize("stray", [1e12, 1_000_000, 2**40])
def test_a_stray_huge_label_is_refused_before_a_model_is_sized_by_it(tmp_path, stray):
    y = np.arange(100) % 3
    y = np.where(np.arange(100) == 0, stray, y).astype(float if isinstance(stray, float) else np.int64)
    msg = _refused(_save(tmp_path, y_train=y))  # 1e12 tried to allocate 400 TB; 1e6 built 1M outputs
    assert f"the largest label is {int(stray)}" in msg and "only 4 distinct labels occur" in msg
    assert "relabel to 0..K-1" in msg and "numpy.unique(y_train, return_inverse=True)" in msg


def test_a_label_beyond_int64_is_refused_not_wrapped(tmp_path):
    msg = _refused(_save(tmp_path, y_train=np.where(np.arange(100) == 0, 1e30, np.arange(100) % 3)))
    assert "d.npz:y_train holds the label 1e+30" in msg and "relabel" in msg


def test_sparse_labels_pass_up_to_a_thousand_classes_or_a_tenth_present(tmp_path):
    """The rule: classes (largest label + 1) <= max(10 * distinct labels, 1000)."""
    y = np.where(np.arange(100) == 0, 999, np.arange(100) % 3)  # 4 labels, 1,000 classes: allowed
    assert load_dataset(str(_save(tmp_path, "a.npz", y_train=y))).num_classes == 1000
    y = (np.arange(100) % 100) * 20  # 100 labels, 1,981 classes (more than 10 x 100 and more than 1,000)
    msg = _refused(_save(tmp_path, "b.npz", y_train=y))
    assert "largest label is 1980" in msg
    y = (np.arange(100) % 100) * 10  # 100 labels, 991 classes
    assert load_dataset(str(_save(tmp_path, "c.npz", y_train=y))).num_classes == 991


@pytest.mark.parametrize("label", [7, 3])
def test_held_out_labels_no_training_image_has_are_said(tmp_path, label):
    """They counted as wrong whatever the model answered, without a word. Not refused: a small training
    subset may lack a class (the model still gets an output for it)."""
    y_test = np.where(np.arange(20) < 5, label, np.arange(20) % 3)  # a 3-class train set: 3 is already outside
    with pytest.warns(UserWarning, match=rf"d\.npz:y_test holds labels no training image has: {label} \(5 of 20 images\)"):
        split = load_dataset(str(_save(tmp_path, y_test=y_test)))
    assert split.num_classes == label + 1


@pytest.mark.parametrize("key", ["y_train", "y_test"])
@pytest.mark.parametrize("label", [-1, -100])
def test_negative_labels_are_refused_in_either_split(tmp_path, key, label):
    n = len(_arrays()[key])
    y = np.where(np.arange(n) < 5, label, np.arange(n) % 3)  # y_train's -100 was silently ignored by cross-entropy
    msg = _refused(_save(tmp_path, **{key: y}))
    assert f"d.npz:{key} holds negative labels: {label} (5 of {n} images)" in msg and "relabel" in msg


def test_the_existing_train_label_checks_come_first(tmp_path):
    msg = _refused(_save(tmp_path, y_train=np.full(100, 3), y_test=np.arange(20) % 5))
    assert "y_train holds one class (3)" in msg
    msg = _refused(_save(tmp_path, y_train=np.linspace(0, 1, 100)))  # a regression target: the Python route named
    assert "float64 values that are not whole numbers" in msg and "compress(..., loss_fn=...)" in msg
    multi_hot = np.zeros((100, 5))
    multi_hot[np.arange(100), np.arange(100) % 5] = 1
    multi_hot[np.arange(100), (np.arange(100) + 1) % 5] = 1  # two labels a row: argmax would drop one, unsaid
    msg = _refused(_save(tmp_path, y_train=multi_hot))
    assert "not one-hot rows" in msg and "multi-label" in msg and "argmax" not in msg
    missing = np.where(np.arange(100) < 2, np.nan, np.arange(100) % 3)  # was called "not whole numbers" alone
    assert "not whole numbers (2 NaN: labels missing; drop those rows)" in _refused(_save(tmp_path, y_train=missing))
    split = load_dataset(str(_save(tmp_path, y_train=(np.arange(100) % 3).astype(float))))  # whole floats pass
    assert split.num_classes == 3 and split.y_train.dtype == split.y_test.dtype


def test_the_cli_prints_one_message_and_exits_2(tmp_path, monkeypatch, capsys):
    from jointcompress import cli

    path = tmp_path / "images.npy"
    np.save(path, _arrays()["x_train"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ntraining: {epochs: 1}\n")
    monkeypatch.setattr(sys, "argv", ["jointcompress", "compress", str(recipe), "--data", str(path), "--out",
                                      str(tmp_path / "o")])
    cli.STATE["debug"] = False
    with pytest.raises(SystemExit) as info:
        cli.main()
    out = capsys.readouterr()
    text = out.out + out.err
    assert info.value.code == 2 and "Traceback" not in text and "holds a single array" in text


def test_good_files_still_load(tmp_path):
    split = load_dataset(str(_save(tmp_path)))
    assert split.x_train.shape == (100, 1, 8, 8) and split.num_classes == 3
    digits = load_dataset("digits")
    assert digits.num_classes == 10 and digits.x_train.shape[1:] == (1, 8, 8)


@pytest.mark.skipif(not MNIST.is_file(), reason="the shared MNIST file is not on this machine")
def test_the_real_mnist_file_loads():
    split = load_dataset(str(MNIST))
    assert split.x_train.shape == (60000, 1, 28, 28) and len(split.y_test) == 10000 and split.num_classes == 10


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_data_argument_is_refused_not_read_as_the_embedded_digits(empty, tmp_path, monkeypatch, capsys):
    assert "give a path to an MNIST-style .npz, or 'digits'" in _refused(empty)
    from cli_helpers import run_cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet5\ntechniques: [{type: quant_lsq, bits: 4}]\ntraining: {epochs: 1}\n")
    code, out = run_cli(monkeypatch, capsys, "compress", recipe, "--data", empty, "--out", tmp_path / "run")
    assert code == 2 and "--data / recipe data is" in out and not (tmp_path / "run" / "artifact").exists()


def test_the_digits_are_scikit_learns_own_read_without_importing_it(monkeypatch):
    """load_digits reads scikit-learn's data file in place (importing sklearn.datasets cost every process ~2 s):
    the same images and labels as the library's loader, with sklearn.datasets unimportable."""
    from sklearn.datasets import load_digits as sk_digits

    from jointcompress.data import _digits_arrays, load_digits

    reference = sk_digits()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # any import of it now raises ImportError
    images, labels = _digits_arrays()
    assert np.array_equal(images, reference.images) and images.dtype == reference.images.dtype
    assert np.array_equal(labels, reference.target)
    split = load_digits()
    assert len(split.x_train) + len(split.x_test) == 1797 and split.x_train.shape[1:] == (1, 8, 8)


def test_a_column_of_labels_reads_as_one_label_per_image(tmp_path):
    """Labels saved with shape (n, 1) were refused with the one-hot hint, save y.argmax(1), which turns every one
    of them into 0; they are one class index per image, read as such."""
    a = _arrays()
    split = load_dataset(str(_save(tmp_path, y_train=a["y_train"][:, None], y_test=a["y_test"][:, None])))
    assert split.y_train.shape == (len(a["y_train"]),) and split.y_train.tolist() == a["y_train"].tolist()
    assert split.y_test.tolist() == a["y_test"].tolist()


@pytest.mark.parametrize("layout", ["gray", "hwc", "table"])
def test_new_inputs_standardised_as_recorded_are_the_inputs_the_model_trained_on(tmp_path, layout):
    """The command line standardises what it reads, and the artifact did not say how: a user's own features put
    through the model read at chance (F float features, divided by 255 and standardised with one mean for all)."""
    import torch

    from jointcompress.data import standardised

    r = np.random.default_rng(1)
    shape = {"gray": (8, 8), "hwc": (8, 8, 3), "table": (12,)}[layout]
    scales = r.uniform(0.01, 500, shape[-1:]).astype(np.float32)  # features of very different ranges
    x_train, x_test = (r.normal(3, 1, (n, *shape)).astype(np.float32) * scales for n in (100, 20))
    split = load_dataset(str(_save(tmp_path, x_train=x_train, x_test=x_test)))
    record = split.standardisation
    assert record["per"] == {"gray": "all", "hwc": "channel", "table": "feature"}[layout]
    assert len(record["mean"]) == {"gray": 1, "hwc": 3, "table": 12}[layout]
    assert torch.allclose(standardised(x_test, record), split.x_test, atol=1e-4)
    if layout == "gray":  # with a channel axis of one, either side: the same images
        for one in (x_test[..., None], x_test[:, None]):
            assert torch.allclose(standardised(one, record), split.x_test, atol=1e-4)
    with pytest.raises(DataError, match=r"standardised: inputs of shape .* but the record was made for"):
        standardised(x_test[..., :5] if layout == "table" else x_test[:, None, None], record)
    if layout == "table":  # each feature on its own scale: standardised column by column, kept [N, F]
        assert split.x_train.shape == (100, 12)
        assert torch.allclose(split.x_train.mean(0), torch.zeros(12), atol=1e-4)
        assert torch.allclose(split.x_train.std(0, unbiased=False), torch.ones(12), atol=1e-3)


def test_a_table_of_features_builds_the_mlp_and_refuses_the_image_models(tmp_path):
    from jointcompress.pipeline import builder_for

    r = np.random.default_rng(0)
    split = load_dataset(str(_save(tmp_path, x_train=r.normal(size=(100, 12)), x_test=r.normal(size=(20, 12)))))
    assert builder_for("lenet300", split)()(split.x_test).shape == (20, 3)
    with pytest.raises(DataError, match=r"a table of 12 features; the reference model 'lenet5' takes images"):
        builder_for("lenet5", split)


def test_grayscale_images_stored_with_their_channel_axis_fit_a_model_trained_without_it(tmp_path):
    """bench --data refused [N, 1, H, W] images for a model trained from the same pixels as [N, H, W] ("standardised
    per channel (1 value(s)), the model's inputs per all (1)"): one channel's statistics are the image's."""
    import torch

    from jointcompress.data import restandardised

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (40, 8, 8)).astype(np.uint8)
    labels = np.arange(40) % 4
    flat, chw = tmp_path / "hw.npz", tmp_path / "chw.npz"
    np.savez(flat, x_train=pixels[:30], y_train=labels[:30], x_test=pixels[30:], y_test=labels[30:])
    np.savez(chw, x_train=pixels[:30, None], y_train=labels[:30], x_test=pixels[30:, None], y_test=labels[30:])
    trained_on, given = load_dataset(str(flat)), load_dataset(str(chw))
    assert trained_on.standardisation["per"] != given.standardisation["per"]  # the two layouts' records differ
    again = restandardised(given.x_test, given.standardisation, trained_on.standardisation)
    assert torch.allclose(again, trained_on.x_test, atol=1e-5)

"""Data: scikit-learn's bundled digits (the embedded default, no download) and MNIST .npz.

Both come back as float tensors [N, C, H, W] normalised with the training set's mean/std (per channel
for colour images; an .npz may hold [N, H, W], [N, H, W, C] or [N, C, H, W] arrays), or [N, F] tables
of features, each feature with its own mean/std, plus int64 labels, split into train and held-out test.
The split records its standardisation in the data file's units (`standardised` applies it to new
inputs; the artifact's manifest keeps it). Loaders carry the sample index so a teacher's logits can be
cached once per dataset.
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .errors import DataError


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    # images held out of the training rows to choose the kept epoch on (training.validation_images), so the
    # test split the accuracy is reported on plays no part in training; None: choices read the test split
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    # how the inputs were standardised from the values the data file holds (input_standardisation): the
    # artifact records it, since the model it trains answers for inputs standardised so and no others
    standardisation: dict | None = None

    def selection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The images a run's choices are made on (the kept epoch, a teacher's best epoch): the validation
        rows when the split has them, else the test split."""
        return (self.x_val, self.y_val) if self.x_val is not None else (self.x_test, self.y_test)

    @property
    def selected_on(self) -> str:
        """Where `selection` reads, as results record it."""
        if self.x_val is None:
            return "test"
        n = len(self.x_val)
        return f"validation ({n} training image{'s' if n != 1 else ''} held out)"

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)


def hold_out(split: Split, images: int, seed: int = 0, what: str = "training.validation_images") -> Split:
    """`split` with `images` of its training rows (a fixed random draw, the same for every run and seed,
    so paired runs train on the same rows) moved to a validation set; 0 (or a split that has one already)
    leaves it as it is. The normalisation stays the one of the full training set. `what`: the setting an
    error names (the field, or the command-line option that set it)."""
    if split.x_val is not None:  # held out already: only the same count is the same run
        if images != len(split.x_val):
            raise DataError(f"{what}: {images}, but the split already holds {len(split.x_val)} training images out; "
                            f"pass the split before its hold-out, or set {what} to {len(split.x_val)}")
        return split
    if not images:
        return split
    from dataclasses import replace

    n = len(split.y_train)
    if images >= n:
        fewer = f"fewer (e.g. {n // 10}, a tenth), or " if n >= 10 else ""
        raise DataError(f"{what}: {images} of {n} training images would leave none to train on; hold out {fewer}0 to "
                        "choose on the test split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:images], order[images:]
    return replace(split, x_train=split.x_train[train], y_train=split.y_train[train],
                   x_val=split.x_train[val], y_val=split.y_train[val])


def _normalise(x_train: np.ndarray, x_test: np.ndarray, scale: float = 1.0):
    """[N, H, W] arrays (grayscale images) standardised with one mean and std over every value, as [N, 1, H, W];
    with the record of it in the data file's units (its values were divided by `scale` first)."""
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
    f = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32)).unsqueeze(1)  # noqa: E731
    return f(x_train), f(x_test), _record("all", [mean * scale], [std * scale])


def _normalise_channels(x_train: np.ndarray, x_test: np.ndarray, scale: float = 1.0):
    """[N, C, H, W] arrays, each channel with the training set's own mean and std."""
    return _normalise_along(x_train, x_test, (0, 2, 3), "channel", scale)


def _normalise_features(x_train: np.ndarray, x_test: np.ndarray, scale: float = 1.0):
    """[N, F] tables, each feature (column) with the training set's own mean and std, as tabular data is."""
    return _normalise_along(x_train, x_test, (0,), "feature", scale)


def _normalise_along(x_train: np.ndarray, x_test: np.ndarray, axes: tuple, per: str, scale: float):
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    f = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    return f(x_train), f(x_test), _record(per, (mean * scale).ravel().tolist(), (std * scale).ravel().tolist())


# how a data file's values become the model's inputs (the recipe's `inputs`): standardised with the training split's
# mean and std (the default); divided by the file's full scale (uint8 pixels to [0, 1], digits' 0-16 likewise), as
# many training scripts feed images; or as the file stores them (a table's raw features). A model given with
# --weights answers only for the form it was trained on.
INPUT_FORMS = ("standardised", "unit_range", "as_stored")
DIGITS_SCALE, PIXEL_SCALE = 16.0, 255.0  # the full scale of the embedded digits' values and of an .npz's pixels


def full_scale(name: str) -> float:
    """What unit_range divides a data set's values by (a Split's name: "digits", or an .npz's file stem)."""
    return DIGITS_SCALE if name == "digits" else PIXEL_SCALE


def _inputs_as(x_train: np.ndarray, x_test: np.ndarray, scale: float, inputs: str):
    """The two splits (values already divided by `scale`) in the form `inputs` names, and its record in the data
    file's units: every form is a mean and std per channel / feature / image, so `standardised` and an
    artifact's manifest describe it alike."""
    if inputs == "standardised":
        standardise = {2: _normalise_features, 3: _normalise}.get(x_train.ndim, _normalise_channels)
        return standardise(x_train, x_test, scale=scale)
    if inputs not in INPUT_FORMS:
        raise DataError(f"inputs: {inputs!r} is not one of {', '.join(INPUT_FORMS)}")
    factor = 1.0 if inputs == "unit_range" else scale  # unit_range keeps value / scale; as_stored undoes it
    per, count = {2: ("feature", x_train.shape[-1]), 3: ("all", 1)}.get(x_train.ndim, ("channel", x_train.shape[1]))
    f = lambda a: torch.from_numpy((a * factor).astype(np.float32))  # noqa: E731
    xtr, xte = f(x_train), f(x_test)
    if x_train.ndim == 3:  # [N, H, W] grayscale, as the model takes it: [N, 1, H, W]
        xtr, xte = xtr.unsqueeze(1), xte.unsqueeze(1)
    return xtr, xte, _record(per, [0.0] * count, [scale / factor] * count)


def _record(per: str, mean: list, std: list) -> dict:
    return {"per": per, "mean": [float(m) for m in mean], "std": [float(v) for v in std],
            "of": "the values the data file holds"}


def standardised(x, record: dict) -> torch.Tensor:
    """Inputs as a data file holds them ([N, H, W] or [N, H, W, C] / [N, C, H, W] images, or an [N, F] table),
    laid out and standardised as the run that read such a file trained its model: `record` is the artifact
    manifest's "input_standardisation" (or a Split's `standardisation`). Why: the command line standardises
    the data it reads (x - mean) / std with the training split's mean and std (per channel, per feature, or
    one for all of a grayscale image's values), and the model it compresses answers only for inputs made so."""
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    per, mean, std = record["per"], np.asarray(record["mean"]), np.asarray(record["std"])
    if per == "feature":
        _fits(x.ndim == 2 and x.shape[1] == len(mean), x, f"[N, {len(mean)}] rows of features")
        return torch.from_numpy(((x - mean) / std).astype(np.float32))
    given = x
    if x.ndim == 3:  # [N, H, W]: one channel, given its axis
        x = x[:, None]
    _fits(x.ndim == 4, given, "[N, H, W] images, or [N, H, W, C] / [N, C, H, W]")
    shaped = _channels_first(x, "inputs")
    channels = 1 if per == "all" else len(mean)
    _fits(shaped.shape[1] == channels, given, f"images of {channels} channel(s)")
    if per == "channel":
        mean, std = mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)
    return torch.from_numpy(((shaped - mean) / std).astype(np.float32))


def restandardised(x: torch.Tensor, given: dict, wanted: dict) -> torch.Tensor:
    """Inputs standardised by the record `given` (a Split's own: its file's training statistics) as the record
    `wanted` standardises them (an artifact's: the statistics its model trained on). Why: a held-out file read
    on its own is standardised with its own training split, and a model answers only for its own statistics."""
    axes = {"all": None, "channel": 1, "feature": 1}  # the Split's layouts: [N, 1, H, W], [N, C, H, W], [N, F]
    kind, wanted_kind = _per(given), _per(wanted)
    if kind not in axes or kind != wanted_kind or len(given["mean"]) != len(wanted["mean"]):
        raise DataError(f"the data is standardised per {given['per']} ({len(given['mean'])} value(s)), the model's inputs "
                        f"per {wanted['per']} ({len(wanted['mean'])}); give data of the layout the model was trained on")
    shape = [1] * x.dim()
    if axes[kind] is not None:
        shape[axes[kind]] = -1
    stats = [torch.tensor(given[k], dtype=torch.float64).reshape(shape) for k in ("mean", "std")]
    target = [torch.tensor(wanted[k], dtype=torch.float64).reshape(shape) for k in ("mean", "std")]
    raw = x.double() * stats[1] + stats[0]
    return ((raw - target[0]) / target[1]).to(x.dtype)


def _per(record: dict) -> str:
    """A record's standardisation, one channel's "channel" read as "all": grayscale images stored [N, 1, H, W]
    are those of an [N, H, W] file, with the same one mean and std (bench --data refused the one layout for
    a model trained on the other)."""
    return "all" if record["per"] == "channel" and len(record["mean"]) == 1 else record["per"]


def _fits(ok: bool, x: np.ndarray, expected: str) -> None:
    if not ok:
        raise DataError(f"standardised: inputs of shape {tuple(x.shape)}, but the record was made for {expected}; give "
                        "inputs as the data file the run read holds them")


def _laid_out(x: np.ndarray, what: str) -> np.ndarray:
    """An [N, F] table of features as it is (each feature standardised on its own); images channels first."""
    return x if x.ndim == 2 else _channels_first(x, what)


def _channels_first(x: np.ndarray, what: str) -> np.ndarray:
    """Images as [N, H, W] (grayscale, kept as they are), or [N, C, H, W] from [N, H, W, C] (Keras /
    CIFAR layout) or [N, C, H, W], with at most 4 channels. The reference models also need them
    square (pipeline.builder_for); the user's own model takes what it takes."""
    if x.ndim == 4 and x.shape[3] <= 4 < x.shape[1]:
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim == 4 and not x.shape[1] <= 4 < x.shape[3]:
        raise DataError(f"data: {what} has shape {x.shape}: which axis holds the channels is unclear; give "
                        "[N, H, W, C] or [N, C, H, W] with at most 4 channels and images larger than 4 pixels")
    if x.ndim not in (3, 4):
        raise DataError(f"data: {what} has shape {x.shape}; expected [N, H, W], [N, H, W, C] or [N, C, H, W] images, "
                        "or an [N, F] table of features")
    return x


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as scikit-learn ships them (images [N, 8, 8] of 0-16, labels), read from its data
    file in place: importing sklearn.datasets (scipy with it) took ~2 s of every process's start, the demo's
    and each torchrun rank's, for one 57 KB file. Another layout of the library falls back to its loader."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running its __init__
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt", encoding="utf-8") as rows:
                table = np.loadtxt(rows, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return d.images, d.target


def load_digits(test_fraction: float = 0.25, seed: int = 0, inputs: str = "standardised") -> Split:
    """scikit-learn's 1,797 8x8 digits, shipped with the package: the no-download default; `inputs`: INPUT_FORMS."""
    images, labels = _digits_arrays()
    x, y = images.astype(np.float32) / DIGITS_SCALE, labels.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    xtr, xte, record = _inputs_as(x[train], x[test], DIGITS_SCALE, inputs)
    return Split(xtr, torch.from_numpy(y[train]), xte, torch.from_numpy(y[test]), "digits", standardisation=record)


def load_mnist(path: str | Path, inputs: str = "standardised") -> Split:
    """MNIST (or any image set) from an .npz with x_train, y_train, x_test, y_test (Keras layout, uint8
    pixels; [N, H, W] grayscale, or colour as [N, H, W, C] or [N, C, H, W]); `inputs`: INPUT_FORMS."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data: {path} is a folder; an image recipe reads one .npz file (x_train, y_train, x_test, "
                        "y_test), and a folder of train / dev text files is read by a recipe with an hf: section")
    if not path.is_file():
        where = "" if path.is_absolute() else f"; a relative path is read from the current directory, {Path.cwd()}"
        raise DataError(f"data: file not found: {path} (expected 'digits' or an .npz with x_train, y_train, x_test, "
                        f"y_test{where})")
    arrays = _read_npz(path)
    x_train, x_test = (_laid_out(_pixels(arrays[k], f"{path}:{k}"), f"{path}:{k}").astype(np.float32) / PIXEL_SCALE
                       for k in ("x_train", "x_test"))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"data: {path}: x_train images are {x_train.shape[1:]} but x_test images {x_test.shape[1:]}; "
                        "they must match")
    _check_images(x_train, f"{path}:x_train")
    _check_images(x_test, f"{path}:x_test")
    xtr, xte, record = _inputs_as(x_train, x_test, PIXEL_SCALE, inputs)
    ytr = _class_labels(arrays["y_train"], f"{path}:y_train", len(x_train))
    yte = _class_labels(arrays["y_test"], f"{path}:y_test", len(x_test))
    if len(np.unique(ytr)) < 2:  # a one-output classifier is right by construction: its 100% would mean nothing
        raise DataError(f"data: {path}:y_train holds one class ({int(ytr[0])}); a classifier needs images of at "
                        "least two classes")
    _class_count(np.concatenate([ytr, yte]), f"{path}:y_train / y_test")
    _check_held_out_labels(yte, ytr, f"{path}:y_test")
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    return Split(xtr, ytr, xte, yte, path.stem, standardisation=record)  # tables name the data set by its file ("mnist")


def _check_images(x: np.ndarray, what: str) -> None:
    """Before normalising: an empty split, or NaN / Inf pixels (which the training set's mean would
    spread to every image, and which would make a test accuracy of garbage), named with their count."""
    if len(x) == 0:
        raise DataError(f"data: {what} holds no images; both splits need at least one")
    bad = int((~np.isfinite(x)).reshape(len(x), -1).any(1).sum())
    if bad:
        raise DataError(f"data: {what}: {bad} of {len(x)} images contain NaN or Inf; clean or drop them")


_SAVEZ = "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_npz(path: Path) -> dict:
    """The four arrays of an .npz, or one DataError naming the file and what to give: for a single-array .npy,
    a truncated or corrupted archive (an interrupted download or copy), a file that is no archive at all,
    a missing key (named, with the keys the archive holds), or an array numpy cannot read without pickle."""
    import zipfile
    import zlib

    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # np.save's .npy: one array, no names
            raise DataError(f"data: {path} holds a single array (shape {loaded.shape}, a .npy file), not an .npz "
                            f"archive; an image data set is one .npz holding x_train, y_train, x_test, y_test: "
                            f"{_SAVEZ}")
        with loaded as f:
            missing = [k for k in _KEYS if k not in f.files]
            if missing and any(name.endswith("data.pkl") for name in f.files):  # torch.save writes a zip too
                raise DataError(f"data: {path} is a torch.save file (a zip of pickles, which is never unpickled "
                                f"here), not an .npz; write the tensors as arrays: numpy.savez(path, "
                                "x_train=x_train.numpy(), y_train=y_train.numpy(), x_test=x_test.numpy(), "
                                "y_test=y_test.numpy())")
            if missing:
                raise DataError(f"data: {path} lacks array{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                f"(it holds {', '.join(f.files) or 'no arrays'}); expected x_train, y_train, x_test, "
                                f"y_test: {_SAVEZ}")
            return {k: f[k] for k in _KEYS}
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise DataError(f"data: {path} is truncated or corrupted, or not an .npz archive ({err}); download or copy "
                        f"it again, or write it with {_SAVEZ}") from None
    except (ValueError, OSError) as err:
        if not zipfile.is_zipfile(path):  # np.load then tries to unpickle it and says so
            raise DataError(f"data: {path} is not an .npz archive (or is truncated); give {_SAVEZ} output") from None
        raise DataError(f"data: {path} is not a readable .npz file: {err}") from None


def _pixels(x: np.ndarray, what: str) -> np.ndarray:
    """Images must hold numbers (integers, floats or booleans): strings, dates, objects or complex values are
    refused by dtype, before a cast would fail with numpy's own error or drop an imaginary part."""
    if x.dtype.kind not in "biuf":
        raise DataError(f"data: {what} holds {x.dtype} values, not numbers; give images as numeric pixel arrays "
                        "(uint8 0..255, or floats)")
    return x


# the command line trains classifiers (cross-entropy, softmax distillation); other targets train from Python
FROM_PYTHON = ("; the command line trains classifiers only: for regression or multi-label targets compress from "
               "Python with your loss, compress(..., loss_fn=...) or jointcompress.prepare (docs/your-model.md)")


def _label_rows_hint(y: np.ndarray) -> str:
    """For [N, K] labels: one-hot rows convert (argmax); rows with several 1s, or other values, are not classes
    (argmax kept one label of a multi-hot row and dropped the others, without a word)."""
    one_hot = y.size and bool(np.all((y == 0) | (y == 1))) and bool(np.all(y.sum(1) == 1))
    return " (one-hot rows: save y.argmax(1))" if one_hot else " (not one-hot rows" + FROM_PYTHON + ")"


def _class_labels(y: np.ndarray, what: str, n: int) -> np.ndarray:
    """One integer class index per image, as int64: one-hot rows or fractional values are refused (a cast
    would silently turn 0.7 into class 0), as are non-numeric and negative labels (cross-entropy would reject
    -1 mid-training, and silently skip -100). A column of labels, shape (n, 1), is read as one (the hint for
    one-hot rows, argmax, would have turned every label into 0)."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"data: {what} has shape {y.shape}; expected one class index per row, shape ({n},)"
                        + (_label_rows_hint(y) if y.ndim == 2 else ""))
    if y.dtype.kind not in "iuf":
        raise DataError(f"data: {what} holds {y.dtype} values; expected integer class indices 0..K-1 (map names or "
                        "booleans onto them, e.g. classes, y = numpy.unique(y, return_inverse=True))")
    whole = np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and bool(np.all(np.mod(y, 1) == 0)))
    if not whole:
        missing = int(np.isnan(y).sum()) if np.issubdtype(y.dtype, np.floating) else 0
        raise DataError(f"data: {what} holds {y.dtype} values that are not whole numbers"
                        + (f" ({missing} NaN: labels missing; drop those rows)" if missing else "")
                        + "; expected integer class indices" + ("" if missing else FROM_PYTHON))
    if len(y) and y.min() < 0:
        raise DataError(f"data: {what} holds negative labels: {_values_with_counts(y[y < 0], len(y))}; expected "
                        "class indices 0..K-1: relabel them, or drop those images")
    if len(y) and y.max() > np.iinfo(np.int64).max // 2:  # beyond int64: the cast would wrap it
        raise DataError(f"data: {what} holds the label {_number(y.max())}, far beyond any class index; expected "
                        "class indices 0..K-1: relabel, e.g. classes, y = numpy.unique(y, return_inverse=True)")
    return y.astype(np.int64)


MAX_SPARSE_CLASSES = 1000  # ImageNet's count: a model this wide is built whatever labels occur


def _class_count(y: np.ndarray, what: str) -> int:
    """The number of classes, the largest training label + 1, which sizes the reference models' output layer.

    Rule: it may exceed neither ten times the number of distinct labels present nor, whichever is larger,
    MAX_SPARSE_CLASSES (1,000). Any label set up to 0..999 passes, and so does a larger one in which at least
    a tenth of the classes occur (a subset of ImageNet-21k's classes with each tenth present); a stray label
    (1e12 among 0..2 asked for a 4 TB output layer, 1,000,000 built a model with a million outputs) or raw ids
    in place of indices are refused, with the relabelling that fixes them."""
    num_classes, distinct = int(y.max()) + 1, len(np.unique(y))
    if num_classes > max(10 * distinct, MAX_SPARSE_CLASSES):
        raise DataError(f"data: {what}: the largest label is {int(y.max())} but only {distinct} distinct labels occur, "
                        f"so the model would get {num_classes} outputs, most of them for classes with no image; labels "
                        "are class indices: relabel to 0..K-1, e.g. classes, y_train = numpy.unique(y_train, "
                        "return_inverse=True) and y_test = numpy.searchsorted(classes, y_test), or drop the stray "
                        "labels")
    return num_classes


def _check_held_out_labels(y: np.ndarray, y_train: np.ndarray, what: str) -> None:
    """Held-out labels of classes no training image has count as wrong whatever the model answers: said, as
    the accuracy is lower for it (not refused: a small training subset may lack a class the model still
    has an output for; the model's outputs cover both splits' labels). Negatives are refused earlier."""
    unseen = ~np.isin(y, np.unique(y_train))
    if unseen.any():
        import warnings

        warnings.warn(f"data: {what} holds labels no training image has: {_values_with_counts(y[unseen], len(y))}; "
                      "those images count as wrong whatever the model answers (give y_test the classes of y_train, "
                      "or drop those images)", stacklevel=3)


def _values_with_counts(values: np.ndarray, total: int, shown: int = 5) -> str:
    """'7 (5 of 20 images), 9 (1 of 20 images)': the first few distinct values, then how many more."""
    vals, counts = np.unique(values, return_counts=True)
    parts = [f"{_number(v)} ({c} of {total} images)" for v, c in zip(vals[:shown], counts[:shown])]
    return ", ".join(parts) + (f" and {len(vals) - shown} more values" if len(vals) > shown else "")


def _number(v) -> str:
    """A label as written: 7 for 7.0, 1000000000000 for 1e12 (whole values are checked before this)."""
    return str(int(v)) if float(v).is_integer() and abs(float(v)) < 1e18 else repr(float(v))


def load_dataset(spec: str | None, inputs: str = "standardised") -> Split:
    """'digits' (default) or a path to an MNIST-style .npz, its values made inputs as `inputs` says (INPUT_FORMS).
    An empty string is refused: a shell variable left empty (`--data "$DATA"`) must not train on the embedded
    digits unnoticed."""
    if spec is not None and not str(spec).strip():
        raise DataError(f"--data / recipe data is {spec!r}: give a path to an MNIST-style .npz, or 'digits' (the "
                        "embedded set), or leave it out for digits")
    if spec in (None, "digits"):
        return load_digits(inputs=inputs)
    return load_mnist(spec, inputs=inputs)


def check_tensors(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    """Fail early, with the field named, on data that would silently corrupt training.
    Inputs may be floats (features, pixels: checked for NaN/Inf) or integers (token ids); labels
    integer class indices, or floats (regression targets, soft labels: checked for NaN/Inf)."""
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{what}: {x.shape[0]} inputs but {y.shape[0]} labels; they must match")
    if x.shape[0] == 0:
        raise DataError(f"{what}: no samples (0 inputs); give at least one batch of training data")
    if x.dtype == torch.bool or x.is_complex():
        raise DataError(f"{what}: inputs have dtype {x.dtype}; give float features or integer token ids")
    if torch.is_floating_point(x) and not torch.isfinite(x).all():
        raise DataError(f"{what}: {_non_finite_samples(x)} input samples contain NaN or Inf; clean or drop them")
    if torch.is_floating_point(y):
        if not torch.isfinite(y).all():
            raise DataError(f"{what}: {_non_finite_samples(y)} labels contain NaN or Inf; clean or drop them")
    elif y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):  # bool, complex, ...
        raise DataError(f"{what}: labels have dtype {y.dtype}; give integer class indices or float targets")


def _non_finite_samples(t: torch.Tensor) -> int:
    """How many samples (rows of the first axis; a 1-D tensor holds one value per sample) hold a NaN or Inf."""
    return int((~torch.isfinite(t)).reshape(len(t), -1).any(1).sum())


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
           drop_last: bool = False) -> DataLoader:
    """A DataLoader over (x, y, index); the index lets teacher logits be cached per sample."""
    check_tensors(x, y, "data")
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(x, y if torch.is_floating_point(y) else y.long(), torch.arange(len(x)))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last)


def order_holders(loader) -> list:
    """What picks a loader's order: itself, its sampler, its batch sampler and that one's sampler (those it has)."""
    batches = getattr(loader, "batch_sampler", None)
    return [h for h in (loader, getattr(loader, "sampler", None), batches, getattr(batches, "sampler", None))
            if h is not None]


def shuffle_generators(loader) -> list[torch.Generator]:
    """The generators a loader's order draws from (order_holders': a user may seed any of them), each once.
    Putting their states back replays the same batches."""
    found = [getattr(h, "generator", None) for h in order_holders(loader)]
    return list({id(g): g for g in found if isinstance(g, torch.Generator)}.values())


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy on held-out data, in eval mode (restores the previous mode). The logits are
    read as training reads them (session.outputs.logits_of): a model returning a Hugging Face
    ModelOutput (ViTForImageClassification) trained, then crashed here on `.argmax`."""
    from .model_call import call_model
    from .session.outputs import logits_of

    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):  # the rows go to the model's device, the predictions come back
        logits = logits_of(call_model(model, x[i : i + batch_size]))
        if i == 0 and len(y) and int(y.max()) >= logits.shape[1]:  # else accuracy 0 without a word
            model.train(was)
            raise DataError(f"evaluation labels go up to {int(y.max())}, but the model gives {logits.shape[1]} "
                            "classes; check that the evaluation data's labels match the model")
        correct += int((logits.argmax(1).cpu() == y[i : i + batch_size].cpu()).sum())
    model.train(was)
    return correct / max(1, len(x))


def fingerprint(tensors) -> list:
    """Per tensor (None stays None): its shape, the sum and the sum of squares of its values, and the sum of its
    rows' sums weighted by their position. Another set of images (or the same in another order) differs in them;
    the same images normalized on another machine (a mean summed in another order) differ by rounding only, where
    an exact digest would refuse a resume there. Read in chunks of rows, in float64."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        rows = t.detach().reshape(len(t), -1) if t.dim() else t.detach().reshape(1, 1)
        total = squares = weighted = 0.0
        for start in range(0, len(rows), FINGERPRINT_CHUNK):
            chunk = rows[start:start + FINGERPRINT_CHUNK].cpu().double()
            sums = chunk.sum(1)
            total += float(sums.sum())
            squares += float((chunk * chunk).sum())
            weighted += float((sums * torch.arange(start + 1, start + len(sums) + 1, dtype=torch.float64)).sum())
        out.append([list(t.shape), total, squares, weighted])
    return out


FINGERPRINT_CHUNK = 4096  # rows converted to float64 at a time


def same_fingerprint(a: list, b: list, tolerance: float = 1e-6) -> bool:
    """Equal shapes, and every sum equal to `tolerance` of its size."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if (x is None) != (y is None) or (x is not None and (x[0] != y[0] or any(
                abs(p - q) > tolerance * max(1.0, abs(p), abs(q)) for p, q in zip(x[1:], y[1:])))):
            return False
    return True


EVALUATOR_SAMPLE = "_jointcompress_sample_inputs"  # the attribute of evaluator()'s functions compress() checks


def evaluator(x: torch.Tensor, y: torch.Tensor):
    """An `evaluate(model) -> {"accuracy": ...}` callable for compress(). The data is checked now, as
    training data is: empty, mismatched or NaN evaluation data scored 0 or failed only after the
    first epoch's training; compress() runs the model on two of its images before training."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError(f"evaluator: x and y must be torch tensors (got {type(x).__name__}, {type(y).__name__}); "
                        "convert with torch.from_numpy(...)")
    check_tensors(x, y, "evaluation data")

    def evaluate(model: torch.nn.Module) -> dict:
        return {"accuracy": accuracy(model, x, y)}

    setattr(evaluate, EVALUATOR_SAMPLE, x[:2])  # compress() runs the model on them before training: images of another shape
    return evaluate

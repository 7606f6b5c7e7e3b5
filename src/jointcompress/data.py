"""Data: scikit-learn's bundled digits (the embedded default, no download) and MNIST .npz.

Both come back as float tensors [N, C, H, W] normalised with the training set's mean/std (per channel
for colour images; an .npz may hold [N, H, W], [N, H, W, C] or [N, C, H, W] arrays),
plus int64 labels, split into train and held-out test. Loaders carry the sample index so a
teacher's logits can be cached once per dataset.
"""
from __future__ import annotations

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

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)


def _normalise(x_train: np.ndarray, x_test: np.ndarray):
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
    f = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32)).unsqueeze(1)  # noqa: E731
    return f(x_train), f(x_test)


def _normalise_channels(x_train: np.ndarray, x_test: np.ndarray):
    """[N, C, H, W] arrays, each channel with the training set's own mean and std."""
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = x_train.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    f = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    return f(x_train), f(x_test)


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
        raise DataError(f"data: {what} has shape {x.shape}; expected [N, H, W], [N, H, W, C] or [N, C, H, W] images")
    return x


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's 1,797 8x8 digits, shipped with the package: the no-download default."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x, y = d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    xtr, xte = _normalise(x[train], x[test])
    return Split(xtr, torch.from_numpy(y[train]), xte, torch.from_numpy(y[test]), "digits")


def load_mnist(path: str | Path) -> Split:
    """MNIST (or any image set) from an .npz with x_train, y_train, x_test, y_test (Keras layout, uint8
    pixels; [N, H, W] grayscale, or colour as [N, H, W, C] or [N, C, H, W])."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data: {path} is a folder; an image recipe reads one .npz file (x_train, y_train, x_test, "
                        "y_test), and a folder of train / dev text files is read by a recipe with an hf: section")
    if not path.is_file():
        raise DataError(f"data: file not found: {path} (expected 'digits' or an .npz with x_train, y_train, x_test, "
                        "y_test)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except KeyError as err:
        raise DataError(f"data: {path} lacks array {err}; expected x_train, y_train, x_test, y_test") from None
    except (ValueError, OSError) as err:
        import zipfile

        if not zipfile.is_zipfile(path):  # np.load then tries to unpickle it and says so
            raise DataError(f"data: {path} is not an .npz archive; give numpy.savez(path, x_train=..., y_train=..., "
                            "x_test=..., y_test=...) output") from None
        raise DataError(f"data: {path} is not a readable .npz file: {err}") from None
    x_train = _channels_first(arrays["x_train"], f"{path}:x_train").astype(np.float32) / 255.0
    x_test = _channels_first(arrays["x_test"], f"{path}:x_test").astype(np.float32) / 255.0
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"data: {path}: x_train images are {x_train.shape[1:]} but x_test images {x_test.shape[1:]}; "
                        "they must match")
    _check_images(x_train, f"{path}:x_train")
    _check_images(x_test, f"{path}:x_test")
    if x_train.ndim == 3:
        xtr, xte = _normalise(x_train, x_test)
    else:
        xtr, xte = _normalise_channels(x_train, x_test)
    ytr = torch.from_numpy(_class_labels(arrays["y_train"], f"{path}:y_train", len(x_train)))
    yte = torch.from_numpy(_class_labels(arrays["y_test"], f"{path}:y_test", len(x_test)))
    if len(ytr.unique()) < 2:  # a one-output classifier is right by construction: its 100% would mean nothing
        raise DataError(f"data: {path}:y_train holds one class ({int(ytr[0])}); a classifier needs images of at "
                        "least two classes")
    return Split(xtr, ytr, xte, yte, path.stem)  # tables and results name the data set by its file ("mnist")


def _check_images(x: np.ndarray, what: str) -> None:
    """Before normalising: an empty split, or NaN / Inf pixels (which the training set's mean would
    spread to every image, and which would make a test accuracy of garbage), named with their count."""
    if len(x) == 0:
        raise DataError(f"data: {what} holds no images; both splits need at least one")
    bad = int((~np.isfinite(x)).reshape(len(x), -1).any(1).sum())
    if bad:
        raise DataError(f"data: {what}: {bad} of {len(x)} images contain NaN or Inf; clean or drop them")


def _class_labels(y: np.ndarray, what: str, n: int) -> np.ndarray:
    """One integer class index per image, as int64: one-hot rows or fractional values are refused (a cast
    would silently turn 0.7 into class 0)."""
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"data: {what} has shape {y.shape}; expected one class index per image, shape ({n},)"
                        + (" (one-hot rows: save y.argmax(1))" if y.ndim == 2 else ""))
    whole = np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and bool(np.all(np.mod(y, 1) == 0)))
    if not whole:
        raise DataError(f"data: {what} holds {y.dtype} values that are not whole numbers; expected integer class "
                        "indices")
    return y.astype(np.int64)


def load_dataset(spec: str | None) -> Split:
    """'digits' (default) or a path to an MNIST-style .npz."""
    if spec in (None, "", "digits"):
        return load_digits()
    return load_mnist(spec)


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
    elif y.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise DataError(f"{what}: labels have dtype {y.dtype}; give integer class indices or float targets")


def _non_finite_samples(t: torch.Tensor) -> int:
    """How many samples (rows of the first axis; a 1-D tensor holds one value per sample) hold a NaN or Inf."""
    return int((~torch.isfinite(t)).reshape(len(t), -1).any(1).sum())


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over (x, y, index); the index lets teacher logits be cached per sample."""
    check_tensors(x, y, "data")
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(x, y if torch.is_floating_point(y) else y.long(), torch.arange(len(x)))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy on held-out data, in eval mode (restores the previous mode)."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train(was)
    return correct / max(1, len(x))


def evaluator(x: torch.Tensor, y: torch.Tensor):
    """An `evaluate(model) -> {"accuracy": ...}` callable for compress()."""
    return lambda model: {"accuracy": accuracy(model, x, y)}

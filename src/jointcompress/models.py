"""Reference models (no torchvision here): LeNet-300-100, LeNet-5, a small ResNet, a small
MobileNetV2 (depthwise separable, inverted residuals), a 1-D CNN, a small vision transformer and an LSTM.

All take [N, 1, H, W] images (28x28 MNIST or 8x8 digits) and return class logits.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class LeNet300(nn.Module):
    """LeNet-300-100: the fully connected MNIST model of Han et al.'s Deep Compression."""

    def __init__(self, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """LeNet-5 (Caffe variant used by Deep Compression): conv20-conv50-fc500-fc10."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5, padding=2 if image_size < 20 else 0)
        self.conv2 = nn.Conv2d(20, 50, 5, padding=2 if image_size < 20 else 0)
        side = image_size if image_size < 20 else ((image_size - 4) // 2 - 4) // 2
        side = side // 4 if image_size < 20 else side
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-8-style network for 28x28 inputs: residual couplings exercise the dependency graph."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection; the input is added
    back where the shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class SmallMobileNet(nn.Module):
    """A MobileNetV2-style network for small images: the depthwise separable convolutions of the models
    deployed on phones and microcontrollers, whose weights are few and whose depthwise layers are
    coupled channel for channel to their expansion (what structured pruning must remove together). The stem
    halves the resolution, as MobileNetV2's does."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(width, width), InvertedResidual(width, 2 * width, stride=2),
                                    InvertedResidual(2 * width, 2 * width), InvertedResidual(2 * width, 4 * width, stride=2),
                                    InvertedResidual(4 * width, 4 * width))
        self.head = nn.Sequential(nn.Conv2d(4 * width, 8 * width, 1, bias=False), nn.BatchNorm2d(8 * width), nn.ReLU6())
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SequenceCNN(nn.Module):
    """A 1-D CNN that reads an image as a sequence (each column one step of H features), the shape
    of an audio or sensor model: Conv1d + BatchNorm1d, a residual block, a strided conv, pooling."""

    def __init__(self, features: int = 28, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.stem = nn.Conv1d(features, width, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm1d(width)
        self.conv1 = nn.Conv1d(width, width, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 5, padding=2, bias=False)
        self.bn2 = nn.BatchNorm1d(width)
        self.down = nn.Conv1d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm1d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x.flatten(1, 2))))  # [N, 1, H, W] -> [N, H, W]: W steps of H features
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = F.relu(self.bn3(self.down(x)))
        return self.fc(x.mean(2))


class TinyViT(nn.Module):
    """A small vision transformer built from torch's own nn.TransformerEncoder: 7x7 patches embedded
    by a Linear layer, fixed sinusoidal positions (nothing to store), pre-norm blocks, mean pooling.
    Its nn.MultiheadAttention is converted to Linear projections (attention.mha_to_linear) so that
    every weight matrix is compressed."""

    def __init__(self, image_size: int = 28, num_classes: int = 10, width: int = 64, depth: int = 2, heads: int = 4,
                 in_channels: int = 1):
        super().__init__()
        from .attention import mha_to_linear

        self.patch = 7 if image_size % 7 == 0 else 4 if image_size % 4 == 0 else 1
        tokens = (image_size // self.patch) ** 2
        self.embed = nn.Linear(in_channels * self.patch * self.patch, width)
        self.register_buffer("position", _sinusoid(tokens, width), persistent=False)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = mha_to_linear(nn.TransformerEncoder(layer, depth, enable_nested_tensor=False))
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        p = self.patch  # [N, C, H, W] -> [N, C, H/p, W/p, p, p] -> [N, tokens, C * p * p]
        x = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(1, 2).flatten(2)
        x = self.encoder(self.embed(x) + self.position)
        return self.fc(self.norm(x).mean(1))


class RowLSTM(nn.Module):
    """An LSTM that reads an image as a sequence (each row one step of W features) and classifies
    its last hidden state: the shape of a speech or sensor sequence model. torch's nn.LSTM, converted
    to Linear layers (recurrent.rnn_to_linear) so that its input and recurrent weights are compressed."""

    def __init__(self, features: int = 28, num_classes: int = 10, hidden: int = 96):
        super().__init__()
        from .recurrent import rnn_to_linear

        self.rnn = rnn_to_linear(nn.LSTM(features, hidden, batch_first=True))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        out, _ = self.rnn(x.flatten(1, 2))  # [N, 1, H, W] -> [N, H, W]: H steps of W features
        return self.fc(out[:, -1])


def _sinusoid(tokens: int, width: int) -> torch.Tensor:
    """The fixed sine / cosine position table of "Attention Is All You Need", [tokens, width]."""
    position = torch.arange(tokens, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-torch.log(torch.tensor(10000.0)) / width))
    table = torch.zeros(tokens, width)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * rate), torch.cos(position * rate)
    return table


MODELS = {"lenet300": LeNet300, "lenet5": LeNet5, "resnet": SmallResNet, "mobilenet": SmallMobileNet,
          "seqcnn": SequenceCNN, "vit": TinyViT, "lstm": RowLSTM}


def is_builder(name: str) -> bool:
    """Whether `model:` names the user's own builder (package.module:function, file.py:function)."""
    return ":" in name and not name.startswith("hf:")


def absolute_builder(name: str) -> str:
    """`name` with a builder file's path made absolute (file.py:function), so the artifact's manifest,
    which records it, names the file from any directory; other names as they are."""
    where, _, func = name.rpartition(":")
    return f"{Path(where).resolve()}:{func}" if is_builder(name) and where.endswith(".py") else name


def _in_library(filename: str) -> bool:
    """Whether `filename` is Python's, an installed package's or jointcompress's own code, not the user's."""
    import sysconfig

    if not filename or filename.startswith("<"):
        return True
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.add(str(Path(__file__).resolve().parent))
    path = str(Path(filename).resolve())
    return any(path.startswith(str(Path(r).resolve()) + os.sep) for r in roots if r)


def _where_raised(exc: BaseException) -> str:
    """'file:line' of the deepest frame of `exc` in the user's own code (a SyntaxError: its own
    file and line), or '' when none is (the failure is deep inside a library with nothing of theirs)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    found, tb = "", exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not _in_library(filename):
            found = f"{filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def _at(exc: BaseException, parenthesized: bool = False) -> str:
    where = _where_raised(exc)
    return "" if not where else f" (in {where})" if parenthesized else f" at {where}"


def _first_line(exc: BaseException) -> str:
    text = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


_BUILDERS: dict[str, object] = {}


# set while a builder's file is imported: a command that file's top-level code starts (a script that builds the
# model and runs `jointcompress bench --model file.py:build` unguarded) would import it again, and so on
IMPORTING_MODEL = "JOINTCOMPRESS_IMPORTING_MODEL"


def load_builder(spec: str):
    """The zero-argument function `spec` names: `package.module:function` (importable, or from the
    current directory as `python -m` would find it) or `path/to/file.py:function`. Loaded once per
    file (a relative path is resolved first: after a chdir it names another file), so every model
    a run builds (teacher, student, the artifact's rebuild) is of one class.
    A file that cannot be imported (not found, a syntax error, an exception while importing it) or
    a builder that needs arguments is a RecipeError naming the file and the original error."""
    where, _, func = spec.rpartition(":")
    key = f"{Path(where).resolve()}:{func}" if where.endswith(".py") and Path(where).is_file() else spec
    if key not in _BUILDERS:
        _BUILDERS[key] = _load_builder(spec)
    return _BUILDERS[key]


load_builder.cache_clear = _BUILDERS.clear  # what a new process starts from (tests)


def _load_builder(spec: str):
    from .errors import RecipeError

    where, _, func = spec.rpartition(":")
    if not where or not func:
        raise RecipeError(f"model {spec!r}: give a built-in model or 'package.module:function' / 'file.py:function'")
    module = _import_builder_module(spec, where)
    builder = getattr(module, func, None)
    if not callable(builder):
        raise RecipeError(f"model {spec!r}: {where!r} has no function {func!r}")
    _check_takes_no_arguments(spec, func, builder)
    return builder


def _import_builder_module(spec: str, where: str):
    """The module of a builder spec, every way importing it can fail named with the user's file:line."""
    from .errors import RecipeError

    if where.endswith(".py"):
        loader = importlib.util.spec_from_file_location(Path(where).stem, where)
        if loader is None or not Path(where).is_file():
            relative = "" if Path(where).is_absolute() else f", read from the current folder {os.getcwd()}"
            raise RecipeError(f"model {spec!r}: cannot import {where!r} (FileNotFoundError: no file {where}{relative}); "
                              "give the builder's path from the folder you run in, or an absolute one")
        folder = str(Path(where).resolve().parent)  # as `python file.py` does: the file imports its neighbours
        if folder not in sys.path:
            sys.path.insert(0, folder)
    elif "" not in sys.path and os.getcwd() not in sys.path:  # a console script does not search it
        sys.path.insert(0, os.getcwd())
    outer = os.environ.get(IMPORTING_MODEL)
    os.environ[IMPORTING_MODEL] = spec  # a command its top-level code starts refuses to run (cli.main)
    try:
        if where.endswith(".py"):
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
            return module
        return importlib.import_module(where)
    except SyntaxError as exc:
        raise RecipeError(f"model {spec!r}: {where!r} has a syntax error{_at(exc)} ({_first_line(exc)}); "
                          "fix the file") from exc
    except ModuleNotFoundError as exc:
        if not where.endswith(".py") and exc.name and (where == exc.name or where.startswith(exc.name + ".")):
            raise RecipeError(f"model {spec!r}: cannot import {where!r} ({_first_line(exc)}); give a module importable "
                              "from the current directory or an installed package, or file.py:function") from exc
        raise RecipeError(f"model {spec!r}: importing {where!r} failed{_at(exc)} ({_first_line(exc)}); "
                          "install the missing package or fix the import") from exc
    except (Exception, SystemExit) as exc:  # noqa: BLE001 -- anything the user's file raises while it is imported
        hint = ("; guard the script part of the file with `if __name__ == \"__main__\":`" if isinstance(exc, SystemExit)
                else "; fix the error in the file")
        raise RecipeError(f"model {spec!r}: importing {where!r} raised {_first_line(exc)}{_at(exc, True)}{hint} "
                          "(--debug shows the traceback)") from exc
    finally:
        if outer is None:
            os.environ.pop(IMPORTING_MODEL, None)
        else:
            os.environ[IMPORTING_MODEL] = outer


def _check_takes_no_arguments(spec: str, func: str, builder) -> None:
    """A builder is called with no arguments; one that needs some is told how to wrap it (before the call,
    so a TypeError raised inside a builder is still reported as the builder's own)."""
    import inspect

    from .errors import RecipeError

    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # a builtin or C function: nothing to check, it is called as it is
        return
    try:
        signature.bind()
    except TypeError:
        needed = [p.name for p in signature.parameters.values() if p.default is p.empty
                  and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        raise RecipeError(f"model {spec!r}: the builder {func}() takes the argument(s) {', '.join(needed)}; a builder "
                          f"must take no arguments: give them defaults, or add e.g. `def build(): return "
                          f"{func}(...)` with the values filled in and name that one") from None


def call_builder(spec: str) -> nn.Module:
    """Call the user's builder `spec` names and check it returned a model: an exception it raises is a
    RecipeError naming the builder, the exception and where in the user's code it was raised."""
    from .errors import JointCompressError, RecipeError

    builder = load_builder(spec)
    try:
        model = builder()
    except JointCompressError:  # already one clear message (the builder called jointcompress and was told why)
        raise
    except Exception as exc:  # noqa: BLE001 -- a bug in the user's builder: name it, not a traceback of ours
        raise RecipeError(f"model {spec!r}: the builder raised {_first_line(exc)}{_at(exc, True)}; fix the builder "
                          "(--debug shows the traceback)") from exc
    if not isinstance(model, nn.Module):
        raise RecipeError(f"model {spec!r}: the builder returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(name: str, image_size: int = 28, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Build a reference model for `in_channels` x `image_size` x `image_size` images (1 x 28 MNIST,
    1 x 8 digits, 3 x 32 an RGB data set). The sequence models read the channels' rows one after
    another (RowLSTM: C x H steps of W features; SequenceCNN: W steps of C x H features).
    `name` may also be the user's own builder (`is_builder`): it is called as it is, since it knows
    the sizes of the data it was written for (compress checks them against the data)."""
    from .errors import RecipeError

    if is_builder(name):
        return call_builder(name)
    if name not in MODELS:
        raise RecipeError(f"model: unknown reference model '{name}'; choose one of {', '.join(MODELS)}, or your "
                          "builder as package.module:function or file.py:function")
    if name == "lenet300":
        return LeNet300(in_channels * image_size * image_size, num_classes)
    if name == "lenet5":
        return LeNet5(in_channels, num_classes, image_size)
    if name == "seqcnn":
        return SequenceCNN(in_channels * image_size, num_classes)
    if name == "vit":
        return TinyViT(image_size, num_classes, in_channels=in_channels)
    if name == "lstm":
        return RowLSTM(image_size, num_classes)
    if name == "mobilenet":
        return SmallMobileNet(in_channels, num_classes)
    return SmallResNet(in_channels, num_classes)

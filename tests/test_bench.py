"""bench() measures what it claims; the bench and dry-run commands work end to end."""
import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from artifact_helpers import SmallCNN, example_input, fake_finalize
from jointcompress.artifact import save
from jointcompress.bench import bench, count_macs, count_params, render_table


def test_count_macs_and_params():
    m = SmallCNN()
    # conv1: 8*28*28*25, conv2: 16*10*10*8*25, fc1: 400*32, fc2: 32*10
    assert count_macs(m, example_input()) == 8 * 784 * 25 + 16 * 100 * 200 + 400 * 32 + 320
    p = count_params(m)
    assert p["total"] == sum(x.numel() for x in m.parameters()) and p["nonzero"] <= p["total"]


def test_bench_before_after(tmp_path):
    x = example_input()
    after, spec = fake_finalize(SmallCNN(), x)
    save(after, spec, tmp_path, example_inputs=x)
    ys = torch.zeros(2, dtype=torch.long)
    res = bench(SmallCNN(), after, x, eval_fn=lambda m: float((m(x).argmax(1) == ys).float().mean()),
                artifact_dir=tmp_path, runs=3)
    json.dumps(res)
    b, a = res["before"], res["after"]
    assert a["params"]["total"] < b["params"]["total"] and a["macs"] < b["macs"] / 2
    files = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert a["bytes_on_disk"] == files and res["ratios"]["bytes_on_disk"] > 5
    assert a["weights_file_bytes"] == (tmp_path / "weights.jcw").stat().st_size < files
    assert res["ratios"]["weights_file_bytes"] == b["bytes_on_disk"] / a["weights_file_bytes"]
    for key in ("latency_ms_b1", "latency_ms_b64"):
        assert b[key] > 0 and a[key] > 0
    assert 0 <= a["accuracy"] <= 1
    table = render_table(res)
    labels = list(table.columns[0]._cells)
    for bs in (1, 64):  # both medians, each with its ratio: tiny models at batch 1 run faster alone
        assert f"latency ms (batch {bs}, interleaved)" in labels and f"latency ms (batch {bs}, alone)" in labels
        assert res["ratios"][f"latency_alone_ms_b{bs}"] == b[f"latency_alone_ms_b{bs}"] / a[f"latency_alone_ms_b{bs}"]


@pytest.fixture
def app():
    from jointcompress.commands import bench_cmd, dryrun_cmd

    app = typer.Typer()
    bench_cmd.register(app)
    dryrun_cmd.register(app)
    return app


def test_dry_run_command_lists_groups_and_skipped(app):
    pytest.importorskip("jointcompress.models")
    r = CliRunner().invoke(app, ["dry-run", "--model", "resnet"])
    assert r.exit_code == 0, r.output
    assert "stem" in r.output and "layer1.conv1" in r.output
    assert "fc" in r.output and "classes are never removed" in r.output
    assert "prune_blocks can remove whole: layer1" in r.output
    assert "raise_stride can run stem at stride 2" in r.output
    r = CliRunner().invoke(app, ["dry-run", "--model", "lenet5"])
    said = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 0 and "raise_stride: not with its defaults" in said and "a flatten into a Linear" in said


def test_bench_command_on_artifact(app, tmp_path):
    models = pytest.importorskip("jointcompress.models")
    x = example_input()
    model, spec = fake_finalize(models.build_model("lenet5"), x)
    spec.recipe = {"model": "lenet5"}
    save(model, spec, tmp_path / "art", builder=lambda: models.build_model("lenet5"), example_inputs=x)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--json", str(out), "--runs", "2"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["model"] == "lenet5" and res["after"]["macs"] < res["before"]["macs"]
    assert "bytes on disk" in r.output
    again = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--json", str(out), "--runs", "2"])
    assert again.exit_code == 0, again.output  # its own earlier measurements are replaced


def _lenet5_artifact_and_data(tmp_path):
    """A LeNet-5 artifact and an .npz of 28x28 images to calibrate and measure it on."""
    import numpy as np

    models = pytest.importorskip("jointcompress.models")
    x = example_input()
    model, spec = fake_finalize(models.build_model("lenet5"), x)
    spec.recipe = {"model": "lenet5"}
    save(model, spec, tmp_path / "art", builder=lambda: models.build_model("lenet5"), example_inputs=x)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 256, (200, 28, 28)).astype(np.uint8),
             y_train=np.arange(200) % 10, x_test=rng.integers(0, 256, (100, 28, 28)).astype(np.uint8),
             y_test=np.arange(100) % 10)
    return tmp_path / "art", tmp_path / "d.npz"


def test_bench_int8_times_the_deployable_int8_model_beside_the_others(app, tmp_path):
    """bench timed the artifact in PyTorch only (its weights dequantized): the int8 ONNX Runtime model a user deploys,
    which demo and bench --against time, had no way in from an artifact."""
    art, data = _lenet5_artifact_and_data(tmp_path)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", str(art), "--data", str(data), "--int8", "--runs", "3", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    b, i8 = res["before"], res["int8"]
    for key in ("latency_ms_b1", "latency_ms_b64", "latency_alone_ms_b1", "latency_alone_ms_b64"):
        assert i8[key] > 0 and res["ratios_int8"][key] == b[key] / i8[key]
    assert res["timing"]["b1"]["threads"] == 1 and "int8" in res["timing"]["b64"]["interleaved_ms"]
    assert 0 <= i8["accuracy"] <= 1 and abs(i8["accuracy"] - res["after"]["accuracy"]) <= 0.2
    flat = " ".join(r.output.split())
    assert "int8 ONNX Runtime: latency ms (batch 64, interleaved)" in flat and "int8 ONNX Runtime: accuracy" in flat
    assert 0.5 <= i8["top1_agreement"] <= 1 and "int8 ONNX Runtime: top-1 agreement with after" in flat
    # the int8 model's file was not reported: about a byte a weight, under the dense fp32 file
    assert res["after"]["params"]["total"] <= i8["bytes_on_disk"] < b["bytes_on_disk"]
    assert res["ratios_int8"]["bytes_on_disk"] == b["bytes_on_disk"] / i8["bytes_on_disk"]
    assert "int8 ONNX Runtime: model file bytes" in flat
    flagged = any(f.startswith("int8 ") for f in res["latency_flagged"])
    assert flagged == ("evicts its weights and code from the caches" in flat)  # said where flagged, and only there
    plain = CliRunner().invoke(app, ["bench", str(art), "--runs", "2"])
    assert plain.exit_code == 0 and "--int8 builds the deployable int8 model" in " ".join(plain.output.split())


def test_bench_int8_that_cannot_be_built_is_said_and_the_rest_measured(app, tmp_path, monkeypatch):
    from jointcompress.deploy import int8

    art, data = _lenet5_artifact_and_data(tmp_path)

    def refused(*args, **kwargs):
        raise RuntimeError("an operator the exporter does not know\nmore lines")

    monkeypatch.setattr(int8, "quantize_int8", refused)
    r = CliRunner().invoke(app, ["bench", str(art), "--data", str(data), "--int8", "--runs", "2"])
    flat = " ".join(r.output.split())
    assert r.exit_code == 0 and "latency ms (batch 1, interleaved)" in flat, r.output
    assert "int8 ONNX Runtime: not measured (RuntimeError: an operator the exporter does not know)" in flat
    assert "int8 ONNX Runtime: latency" not in flat
    against = CliRunner().invoke(app, ["bench", "--against", "torch-pruning", "--model", "lenet5", "--int8"])
    assert against.exit_code != 0 and "--int8: read by a bench of ARTIFACT_DIR" in str(against.exception)


def test_bench_json_onto_a_file_it_did_not_write_is_refused_before_measuring(app, tmp_path):
    """`--json ART/manifest.json` replaced the manifest of the artifact it measured (and a run's teacher, a weights
    file) with the measurements; nothing kept the file."""
    from jointcompress.commands.bench_cmd import _check_json_path
    from jointcompress.errors import JointCompressError

    for name, content in (("manifest.json", '{"format": "jointcompress-artifact"}'), ("weights.jcw", "JCW\x00"),
                          ("notes.txt", "mine")):
        (tmp_path / name).write_text(content)
        with pytest.raises(JointCompressError, match="exists and is not a result bench wrote"):
            _check_json_path(tmp_path / name)
        assert (tmp_path / name).read_text() == content
    _check_json_path(tmp_path / "new.json")  # a new file, or bench's own earlier one, is written


def test_bench_counts_the_artifacts_own_files_not_others_in_its_folder(tmp_path):
    x = example_input()
    after, spec = fake_finalize(SmallCNN(), x)
    manifest = save(after, spec, tmp_path, example_inputs=x)
    (tmp_path / ".weights.jcw.abc.tmp").write_bytes(b"0" * 5000)  # left by a save that was killed
    (tmp_path / "notes.txt").write_text("mine")
    res = bench(SmallCNN(), after, x, artifact_dir=tmp_path, runs=2, batch_sizes=(1,))
    assert res["after"]["weights_file_bytes"] == manifest["weights_file_bytes"]
    assert res["after"]["bytes_on_disk"] == manifest["weights_file_bytes"] + (tmp_path / "manifest.json").stat().st_size


def test_bench_command_times_an_artifact_of_token_ids_without_data(app, tmp_path):
    class Text(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3)

        def forward(self, ids):
            return self.fc(self.emb(ids).mean(1))

    ids = torch.randint(0, 50, (2, 12))
    model, spec = fake_finalize(Text(), ids, prune=0)
    save(model, spec, tmp_path / "art", example_inputs=ids)
    (tmp_path / "text_model.py").write_text(
        "import torch\n"
        "class Text(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb, self.fc = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3)\n"
        "    def forward(self, ids):\n"
        "        return self.fc(self.emb(ids).mean(1))\n"
        "def build():\n"
        "    return Text()\n")
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--model", f"{tmp_path / 'text_model.py'}:build",
                                 "--runs", "2"])
    assert r.exit_code == 0, r.output
    assert "weights file bytes" in r.output and "pass --data" in r.output


class _Recurrent(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.fc = rnn, torch.nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x):
        return self.fc(self.rnn(input=x)[0][:, -1])  # by keyword: the hooks read it there


@pytest.mark.parametrize("kind", ["lstm", "gru2_bidirectional"])
def test_count_macs_counts_every_step_of_a_recurrent_layer(kind):
    steps, width, hidden = 7, 8, 16
    if kind == "lstm":  # one layer, 4 gates over [input, hidden]
        rnn, expected = torch.nn.LSTM(width, hidden, batch_first=True), steps * 4 * hidden * (width + hidden)
    else:  # two layers both ways, 3 gates; the second layer reads both directions' states
        rnn = torch.nn.GRU(width, hidden, num_layers=2, bidirectional=True, batch_first=True)
        expected = steps * 2 * 3 * hidden * ((width + hidden) + (2 * hidden + hidden))
    head = rnn.hidden_size * (2 if rnn.bidirectional else 1) * 3
    assert count_macs(_Recurrent(rnn), torch.randn(2, steps, width)) == expected + head


def test_count_macs_counts_attentions_products():
    tokens, dim = 10, 16
    mha = torch.nn.MultiheadAttention(dim, 2, batch_first=True)

    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x)[0]

    projections = tokens * dim * 3 * dim + tokens * dim * dim  # q, k, v in; out
    products = 2 * tokens * tokens * dim  # QK^T and AV over all heads
    assert count_macs(SelfAttention().eval(), torch.randn(2, tokens, dim)) == projections + products


def test_bench_with_data_of_another_shape_names_data_and_both_shapes(app, tmp_path):
    """An artifact of a model on 3-channel 16x16 images, benched with --data digits (1x8x8): a RuntimeError
    traceback from the MAC count before."""
    from jointcompress.errors import JointCompressError

    (tmp_path / "colour_model.py").write_text(
        "import torch.nn as nn\n"
        "def cnn():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),\n"
        "                         nn.Linear(8 * 8 * 8, 10))\n")
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("colour_model", tmp_path / "colour_model.py")
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    x = torch.randn(2, 3, 16, 16)
    model, spec = fake_finalize(mod.cnn(), x, prune=0)
    spec.recipe = {"model": f"{tmp_path / 'colour_model.py'}:cnn"}
    save(model, spec, tmp_path / "art", example_inputs=x)
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--data", "digits", "--runs", "2"])
    assert r.exit_code != 0 and isinstance(r.exception, JointCompressError), r.exception
    message = str(r.exception)
    assert "--data digits" in message and "[1, 8, 8]" in message and "[3, 16, 16]" in message
    assert "example_inputs" in message


def test_bench_of_a_fully_convolutional_builder_takes_the_default_class_count(tmp_path):
    """The class count was read off the builder's last nn.Linear: an IndexError for a model with none."""
    from jointcompress.commands.bench_cmd import _num_classes

    builder = tmp_path / "allconv.py"
    builder.write_text("import torch.nn as nn\n"
                       "def build():\n"
                       "    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 10, 1),\n"
                       "                         nn.AdaptiveAvgPool2d(1), nn.Flatten())\n")
    assert _num_classes({"layers": {}}, f"{builder}:build") == 10


def test_the_before_accuracy_is_the_artifacts_only_on_the_test_images_it_was_measured_on():
    """bench --data matched the recorded "before" accuracy by the file's stem: another gray.npz (other test
    images) got the recorded 100% and a delta of -78 points. The manifest records the split's digest now."""
    from types import SimpleNamespace

    from jointcompress.checkpoint import data_digest
    from jointcompress.commands.bench_cmd import _same_data

    x, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 3
    split = SimpleNamespace(name="gray", x_test=x, y_test=y)
    extra = {"data": "gray", "data_sha256": data_digest((x, y))}
    assert _same_data(extra, split)
    assert not _same_data(extra, SimpleNamespace(name="gray", x_test=x, y_test=y.flip(0)))
    assert _same_data({"data": "gray"}, split) and not _same_data({"data": "other"}, split)  # older manifests


_CONV1D = ("import torch\n"
           "def build():\n"
           "    return torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool1d(1),\n"
           "                               torch.nn.Flatten(), torch.nn.Linear(4, 3))\n")
_STEPS = ("import torch\n"  # runs on the images too, a mean over the added axis, and keeps an extra axis in its logits
          "class M(torch.nn.Module):\n"
          "    def __init__(self):\n"
          "        super().__init__()\n"
          "        self.step, self.head = torch.nn.Linear(16, 8), torch.nn.Linear(8, 3)\n"
          "    def forward(self, x):\n"
          "        return self.head(torch.relu(self.step(x)).mean(1))\n"
          "def build():\n"
          "    return M()\n")


_SQUEEZED = ("import torch\n"  # .squeeze() takes the batch axis off one sample's logits too
             "class M(torch.nn.Module):\n"
             "    def __init__(self):\n"
             "        super().__init__()\n"
             "        self.conv, self.fc = torch.nn.Conv1d(2, 4, 3), torch.nn.Linear(4, 3)\n"
             "    def forward(self, x):\n"
             "        return self.fc(torch.nn.functional.adaptive_avg_pool1d(torch.relu(self.conv(x)), 1).squeeze())\n"
             "def build():\n"
             "    return M()\n")
_RESHAPED = _STEPS.replace(".mean(1))\n", ".mean(1)).reshape(len(x), -1)\n")  # on the images: rows over 6 columns


@pytest.mark.parametrize("source", [_CONV1D, _STEPS, _SQUEEZED, _RESHAPED],
                         ids=["conv1d", "per_step_linear", "squeezed", "reshaped"])
def test_bench_reads_the_samples_of_a_conv1d_artifact_as_its_file_holds_them(app, tmp_path, source):
    """[N, C, L] samples, saved as the model takes them, were read as grayscale images with a channel axis added,
    and bench refused the data the artifact was compressed on, telling the user to pass data of that shape. A
    model that runs on the images too but keeps their extra axis in its logits failed inside the accuracy."""
    import numpy as np

    (tmp_path / "wave.py").write_text(source)
    namespace: dict = {}
    exec(source, namespace)
    x = torch.randn(40, 2, 16)
    model, spec = fake_finalize(namespace["build"](), x[:2], prune=0)
    save(model, spec, tmp_path / "art", example_inputs=x[:2])
    y = np.arange(40) % 2  # the file shows 2 of the model's 3 classes: what bench decides must not hang on them
    np.savez(tmp_path / "wave.npz", x_train=x[:30].numpy(), y_train=y[:30], x_test=x[30:].numpy(), y_test=y[30:])
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--model", f"{tmp_path / 'wave.py'}:build",
                                 "--data", str(tmp_path / "wave.npz"), "--runs", "2", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    from jointcompress.artifact import load
    from jointcompress.data import accuracy

    expected = accuracy(load(tmp_path / "art", namespace["build"]), x[30:], torch.as_tensor(y[30:]))  # as the file holds it
    assert json.loads((tmp_path / "b.json").read_text())["after"]["accuracy"] == pytest.approx(expected)


def test_bench_keeps_the_images_of_a_model_that_takes_them_with_or_without_a_channel_axis(app, tmp_path):
    """A built-in LeNet-300-100 saved with [N, H, W] inputs (it flattens, so it takes those too): the [C, L] reading
    took the channel axis off, the builder was then made for H input channels, and bench refused the artifact."""
    import numpy as np

    from jointcompress.models import build_model

    x = (torch.rand(60, 8, 8, generator=torch.Generator().manual_seed(0)) * 16).round()
    y = np.arange(60) % 3
    model, spec = fake_finalize(build_model("lenet300", image_size=8, num_classes=3, in_channels=1), x[:2], prune=0)
    save(model, spec, tmp_path / "art", example_inputs=x[:2])
    np.savez(tmp_path / "d.npz", x_train=x[:40].numpy(), y_train=y[:40], x_test=x[40:].numpy(), y_test=y[40:])
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--model", "lenet300", "--data", str(tmp_path / "d.npz"),
                                 "--runs", "2"])
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output


def test_bench_of_a_users_model_saved_without_example_inputs_asks_for_data(app, tmp_path):
    """Saved with no example inputs, bench fed the user's 30-feature MLP a 28x28 image and stopped with torch's
    "mat1 and mat2 shapes cannot be multiplied" traceback."""
    source = "import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))\n"
    (tmp_path / "tab.py").write_text(source)
    namespace: dict = {}
    exec(source, namespace)
    model, spec = fake_finalize(namespace["build"](), torch.randn(2, 30), prune=0)
    save(model, spec, tmp_path / "art")
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--model", f"{tmp_path / 'tab.py'}:build", "--runs", "2"])
    from jointcompress.errors import ArtifactError  # the command line prints it as one message, exit 2

    assert isinstance(r.exception, ArtifactError), r.output
    assert "records no example inputs" in str(r.exception) and "pass --data" in str(r.exception)
    assert "does not take the default [1, 1, 28, 28] input (RuntimeError" in str(r.exception)
    # one that takes the default input is timed on it, as before
    source = "import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 2))\n"
    (tmp_path / "img.py").write_text(source)
    exec(source, namespace)
    model, spec = fake_finalize(namespace["build"](), torch.randn(2, 1, 28, 28), prune=0)
    save(model, spec, tmp_path / "img")
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "img"), "--model", f"{tmp_path / 'img.py'}:build", "--runs", "2"])
    assert r.exit_code == 0, r.output


def test_bench_of_a_table_of_features_sizes_the_mlp_from_the_recorded_inputs(app, tmp_path):
    import numpy as np

    from jointcompress.models import LeNet300

    model, spec = fake_finalize(LeNet300(12, 3), torch.randn(2, 12), prune=0)
    save(model, spec, tmp_path / "art", example_inputs=torch.randn(2, 12))
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--model", "lenet300", "--runs", "2"])
    assert r.exit_code == 0, r.output
    rows = np.random.default_rng(0).normal(size=(40, 12))
    np.savez(tmp_path / "t.npz", x_train=rows[:30], y_train=np.arange(30) % 3, x_test=rows[30:], y_test=np.arange(10) % 3)
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--model", "lenet300", "--data", str(tmp_path / "t.npz"),
                                 "--runs", "2"])
    assert r.exit_code == 0 and "accuracy" in r.output, r.output


def _builder_module(tmp_path, name: str, source: str):
    """The module of a builder file written into tmp_path (bench imports it by path, as a user's file)."""
    from importlib.util import module_from_spec, spec_from_file_location

    (tmp_path / f"{name}.py").write_text(source)
    loader = spec_from_file_location(name, tmp_path / f"{name}.py")
    module = module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


MLP_SOURCE = ("import torch.nn as nn\n"
              "def mlp():\n"
              "    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))\n")


def test_bench_data_is_standardised_as_the_artifacts_model_was_trained(app, tmp_path):
    """bench --data standardised a held-out file with its own training split's statistics, not the ones the model
    was trained on (the manifest's input_standardisation), and read another accuracy than the model's; an artifact
    saved without that record is read as --inputs says."""
    import numpy as np

    from jointcompress.data import accuracy, load_mnist
    from jointcompress.errors import JointCompressError

    torch.manual_seed(0)  # the random model's accuracies must differ between the two standardisations
    module = _builder_module(tmp_path, "mlp", MLP_SOURCE)
    rng = np.random.default_rng(0)
    x_test, y_test = rng.integers(0, 256, (60, 4, 4)).astype(np.uint8), np.arange(60) % 3
    np.savez(tmp_path / "trained.npz", x_train=rng.integers(0, 256, (40, 4, 4)).astype(np.uint8), y_train=np.arange(40) % 3,
             x_test=x_test, y_test=y_test)
    np.savez(tmp_path / "held.npz", x_train=rng.integers(0, 60, (40, 4, 4)).astype(np.uint8), y_train=np.arange(40) % 3,
             x_test=x_test, y_test=y_test)  # the same test images; a darker training split
    trained = load_mnist(tmp_path / "trained.npz")
    model, spec = fake_finalize(module.mlp(), trained.x_test[:2], prune=0)
    spec.recipe = {"model": f"{tmp_path / 'mlp.py'}:mlp"}
    save(model, spec, tmp_path / "art", example_inputs=trained.x_test[:2],
         extra={"input_standardisation": trained.standardisation})
    held = load_mnist(tmp_path / "held.npz")
    with torch.no_grad():
        assert accuracy(model, held.x_test, held.y_test) != accuracy(model, trained.x_test, trained.y_test)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--data", str(tmp_path / "held.npz"), "--runs", "2",
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["after"]["accuracy"] == pytest.approx(accuracy(model, trained.x_test, trained.y_test))
    assert "standardised with the statistics the model was trained on" in result["note"]
    assert "records no input standardisation" not in result["note"]

    # saved without the record (the Python API's save, extra left out): what the model trained on is unknown, so the
    # accuracy on the file's values as they are is said beside the standardised one, which alone read 0.680 for 0.820
    save(model, spec, tmp_path / "bare", example_inputs=trained.x_test[:2])
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "bare"), "--data", str(tmp_path / "trained.npz"), "--runs", "2",
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    with torch.no_grad():
        raw = accuracy(model, torch.as_tensor(x_test, dtype=torch.float32).unsqueeze(1), torch.as_tensor(y_test))
    assert result["after"]["accuracy"] == pytest.approx(accuracy(model, trained.x_test, trained.y_test))
    scaled = accuracy(model, torch.as_tensor(x_test, dtype=torch.float32).unsqueeze(1) / 255, torch.as_tensor(y_test))
    assert "records no input standardisation" in result["note"]
    # the file's values as they are, and / 255 (a model trained on pixels in [0, 1], as most scripts train)
    assert f"on the file's values as they are {raw:.3f}, and on the file's values / 255 {scaled:.3f}" in result["note"]

    # --inputs says what the manifest does not: the accuracy row is then the model's on those inputs, the int8
    # model calibrated on them too, and the note of the unknown is gone
    for form, expected in (("as_stored", raw), ("unit_range", scaled)):
        r = CliRunner().invoke(app, ["bench", str(tmp_path / "bare"), "--data", str(tmp_path / "trained.npz"), "--runs",
                                     "2", "--inputs", form, "--json", str(out)])
        assert r.exit_code == 0, r.output
        result = json.loads(out.read_text())
        assert result["after"]["accuracy"] == pytest.approx(expected), form
        assert "records no input standardisation" not in (result.get("note") or "")
    # where the manifest records them, or without --data, --inputs is refused by name, not silently one or the other
    for args, words in (([str(tmp_path / "art"), "--data", str(tmp_path / "held.npz")], "records the inputs its model"),
                        ([str(tmp_path / "bare")], "add --data")):
        r = CliRunner().invoke(app, ["bench", *args, "--inputs", "as_stored", "--runs", "2"])
        assert r.exit_code != 0 and isinstance(r.exception, JointCompressError), r.exception
        assert words in str(r.exception) and "--inputs as_stored" in str(r.exception)


def test_bench_of_a_pooling_model_on_data_of_another_size_says_whose_shape_the_macs_are(app, tmp_path):
    """A model that pools globally runs on 14x14 images as on 28x28: bench --data of the smaller ones reported
    a quarter of the MACs with no word that they were not the artifact's inputs."""
    module = _builder_module(tmp_path, "pool", "import torch.nn as nn\n"
                                               "def cnn():\n"
                                               "    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), "
                                               "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))\n")
    x = torch.randn(2, 1, 16, 16)
    model, spec = fake_finalize(module.cnn(), x, prune=0)
    spec.recipe = {"model": f"{tmp_path / 'pool.py'}:cnn"}
    save(model, spec, tmp_path / "art", example_inputs=x)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--data", "digits", "--runs", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "MACs and latency are of --data's inputs, shaped [1, 8, 8]; the artifact was made for [1, 16, 16]" in \
        json.loads(out.read_text())["note"]


def test_bench_of_a_second_runs_artifact_keeps_one_model_in_the_before_column(app, tmp_path):
    """A second run (compress --weights FIRST) records the first run's smaller model's parameters and accuracy;
    bench's "before" put those parameters beside the builder's full model's MACs, bytes and latency (params 1.11x
    beside MACs 3.68x, 31x against compress's 9.3x). The column is the builder's; the start model is said."""
    import numpy as np

    module = _builder_module(tmp_path, "mlp", MLP_SOURCE)
    x = torch.randn(2, 1, 4, 4)
    model, spec = fake_finalize(module.mlp(), x, prune=0)
    spec.recipe = {"model": f"{tmp_path / 'mlp.py'}:mlp"}
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 256, (40, 4, 4)).astype(np.uint8), y_train=np.arange(40) % 3,
             x_test=rng.integers(0, 256, (30, 4, 4)).astype(np.uint8), y_test=np.arange(30) % 3)
    started = {"total": 150, "nonzero": 140}  # the first run's model, smaller than the builder's 243 parameters
    save(model, spec, tmp_path / "art", example_inputs=x,
         extra={"baseline_params": started, "baseline_accuracy": 0.9, "data": "d"})
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "art"), "--data", str(tmp_path / "d.npz"), "--runs", "2",
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["before"]["params"]["total"] == sum(p.numel() for p in module.mlp().parameters()) == 243
    assert "accuracy" not in result["before"] and "accuracy_delta" not in result["ratios"]
    assert "started from another model (compress --weights), of 150 parameters at accuracy 0.900" in result["note"]

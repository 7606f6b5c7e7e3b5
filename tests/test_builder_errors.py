"""A user's own model builder (`--model file.py:function`) with a bug in it: one clear message naming the
file / function, the kind of failure and the original error, exit 2, never a traceback (unless --debug).
The same for dry-run's own inputs (a builder that returns no model, a negative --image-size)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import run_cli
from jointcompress.errors import JointCompressError, RecipeError

BUILDERS = '''import torch.nn as nn

def _helper():
    raise ValueError("my builder is broken")

def raises():
    return _helper()

def needs_arg(width):
    return nn.Linear(64, width)

def not_module():
    return {"a": 1}

def good():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
'''


_cli = run_cli


@pytest.fixture
def files(tmp_path) -> Path:
    (tmp_path / "mymodel.py").write_text(BUILDERS)
    (tmp_path / "syntax_error.py").write_text("import torch\n\ndef build(:\n    pass\n")
    (tmp_path / "import_error.py").write_text('raise RuntimeError("boom at import")\ndef build(): pass\n')
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\ndef build(): pass\n")
    return tmp_path


# (builder, words the message must hold); {d} is the folder of the files
CASES = {
    "raises": ("mymodel.py:raises", ["mymodel.py:raises", "the builder raised ValueError: my builder is broken",
                                     "{d}/mymodel.py:4", "fix the builder"]),
    "needs_arg": ("mymodel.py:needs_arg", ["mymodel.py:needs_arg", "needs_arg()", "width", "must take no arguments"]),
    "syntax_error": ("syntax_error.py:build", ["syntax_error.py:build", "syntax error", "{d}/syntax_error.py:3",
                                               "SyntaxError"]),
    "import_error": ("import_error.py:build", ["import_error.py:build", "importing", "RuntimeError: boom at import",
                                               "{d}/import_error.py:1"]),
    "exits": ("exits.py:build", ["exits.py:build", "SystemExit: 3", "__main__"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_build_model_names_a_broken_builder(files, case):
    from jointcompress.models import build_model

    spec, words = CASES[case]
    with pytest.raises(RecipeError) as info:
        build_model(str(files / spec))
    message = str(info.value)
    for word in words:
        assert word.format(d=files) in message, message
    if case != "needs_arg":  # the original exception is kept for --debug
        assert info.value.__cause__ is not None


def test_a_builder_that_needs_an_argument_is_refused_before_it_is_called(files):
    from jointcompress.models import load_builder

    with pytest.raises(RecipeError, match="must take no arguments"):
        load_builder(str(files / "mymodel.py:needs_arg"))


def test_a_module_that_imports_a_missing_package_is_told_apart_from_a_missing_module(files, monkeypatch):
    from jointcompress.models import build_model

    (files / "uses_missing.py").write_text("import no_such_package_xyz_123\ndef build(): pass\n")
    missing = r"importing '.*uses_missing.py' failed at .*uses_missing.py:1 .*no_such_package_xyz_123"
    with pytest.raises(RecipeError, match=missing):
        build_model(str(files / "uses_missing.py:build"))
    with pytest.raises(RecipeError, match="cannot import 'no_such_package_xyz_123.models'"):
        build_model("no_such_package_xyz_123.models:build")


def test_a_builders_own_jointcompress_error_passes_through(files):
    from jointcompress.models import build_model

    (files / "own.py").write_text("from jointcompress.errors import DataError\n"
                                  "def build():\n    raise DataError('the weights file is for 3 channels')\n")
    with pytest.raises(JointCompressError, match="^the weights file is for 3 channels$"):
        build_model(str(files / "own.py:build"))


@pytest.mark.parametrize("case", list(CASES))
def test_dry_run_names_a_broken_builder(files, monkeypatch, capsys, case):
    spec, words = CASES[case]
    monkeypatch.chdir(files)
    code, out = _cli(monkeypatch, capsys, "dry-run", "--model", spec, "--input-shape", "1,1,8,8")
    assert code == 2 and "Traceback" not in out, out
    for word in words:
        assert word.format(d=files) in out, out


@pytest.mark.parametrize("command", ["compress", "sensitivity"])
@pytest.mark.parametrize("case", ["raises", "needs_arg", "syntax_error", "import_error"])
def test_compress_and_sensitivity_name_a_broken_builder(files, monkeypatch, capsys, command, case):
    spec, words = CASES[case]
    monkeypatch.chdir(files)
    recipe = files / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ntraining: {epochs: 1, batch_size: 64}\n"
                      "techniques: [{type: prune_unstructured, sparsity: 0.5}]\n")
    code, out = _cli(monkeypatch, capsys, command, recipe, "--model", spec, "--out", files / "o",
                     "--teacher-epochs", 1)
    assert code == 2 and "Traceback" not in out, out
    for word in words:
        assert word.format(d=files) in out, out


def test_dry_run_checks_what_the_builder_returned(files, monkeypatch, capsys):
    monkeypatch.chdir(files)
    code, out = _cli(monkeypatch, capsys, "dry-run", "--model", "mymodel.py:not_module", "--input-shape", "1,1,8,8")
    assert code == 2 and "the builder returned dict, not a torch.nn.Module" in out and "Traceback" not in out, out
    code, out = _cli(monkeypatch, capsys, "dry-run", "--model", "mymodel.py:good", "--input-shape", "1,1,8,8")
    assert code in (0, None) and "prunable channel groups" in out, out


@pytest.mark.parametrize("size", ["-3", "0"])
def test_dry_run_refuses_an_image_size_below_one(monkeypatch, capsys, size):
    code, out = _cli(monkeypatch, capsys, "dry-run", "--model", "lenet5", "--image-size", size)
    assert code == 2 and f"--image-size {size}: give" in out and "positive" in out and "Traceback" not in out, out


def test_a_relative_builder_path_names_the_file_it_resolves_to_after_a_chdir(tmp_path, monkeypatch):
    from jointcompress.models import load_builder

    for folder, width in (("one", 3), ("two", 5)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "net.py").write_text(f"import torch.nn as nn\n\ndef build():\n    return nn.Linear(2, {width})\n")
    monkeypatch.chdir(tmp_path / "one")
    assert load_builder("net.py:build")().out_features == 3
    monkeypatch.chdir(tmp_path / "two")
    assert load_builder("net.py:build")().out_features == 5  # not the first folder's cached builder
    assert load_builder(f"{tmp_path / 'two' / 'net.py'}:build") is load_builder("net.py:build")  # one file, one class


@pytest.mark.parametrize("case", ["needs_arg", "syntax_error", "import_error"])
def test_recipe_validate_imports_the_builder_as_compress_would(files, monkeypatch, capsys, case):
    """`recipe validate` said ok to a builder file that compress could not import."""
    spec, words = CASES[case]
    monkeypatch.chdir(files)
    (files / "v.yaml").write_text(f"model: {spec}\ntechniques: [{{type: quant_lsq, bits: 4}}]\n")
    code, out = _cli(monkeypatch, capsys, "recipe", "validate", files / "v.yaml")
    assert code == 2 and "Traceback" not in out, out
    for word in words:
        assert word.format(d=files) in out, out
    (files / "ok.yaml").write_text("model: mymodel.py:good\ntechniques: [{type: quant_lsq, bits: 4}]\n")
    code, out = _cli(monkeypatch, capsys, "recipe", "validate", files / "ok.yaml")
    assert code in (0, None) and "ok" in out and "model=mymodel.py:good" in out, out


def test_dry_run_calls_the_builder_once(files, monkeypatch, capsys):
    (files / "counted.py").write_text("import torch.nn as nn\nCALLS = []\n\ndef build():\n    CALLS.append(1)\n"
                                      "    print(f'built {len(CALLS)}')\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    monkeypatch.chdir(files)
    code, out = _cli(monkeypatch, capsys, "dry-run", "--model", "counted.py:build", "--input-shape", "1,1,8,8")
    assert code in (0, None) and "built 1" in out and "built 2" not in out, out


def test_a_builder_named_like_an_emoji_code_is_printed_as_written(files, monkeypatch, capsys):
    """`models.py:cat` printed as "models.py🐱": rich read ":cat:" as an emoji code."""
    (files / "zoo.py").write_text("import torch.nn as nn\n\ndef cat():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    monkeypatch.chdir(files)
    code, out = _cli(monkeypatch, capsys, "dry-run", "--model", "zoo.py:cat", "--input-shape", "1,1,8,8")
    assert code in (0, None) and "zoo.py:cat: prunable channel groups" in out and "\U0001f431" not in out, out


def test_a_command_the_model_files_own_code_starts_is_refused_not_started_again(tmp_path, monkeypatch):
    """A script that defines build() and, unguarded, runs `jointcompress bench --model script.py:build`: the command
    imported the script, whose code started the command again, which imported it again: 69 processes of 350 MB
    each within minutes, until the machine ran out of memory. The command the import starts refuses by name."""
    import os

    from jointcompress.models import IMPORTING_MODEL, load_builder

    (tmp_path / "script.py").write_text(
        "import subprocess, sys\nimport torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(8, 2))\n\n"
        "child = subprocess.run([sys.executable, '-c', 'import sys; from jointcompress.cli import main; "
        "sys.argv = [\"jointcompress\", \"dry-run\", \"--model\", \"script.py:build\", \"--input-shape\", \"1,8\"]; main()'], "
        "capture_output=True, text=True)\n"
        "open('child.txt', 'w').write(f'{child.returncode}\\n{child.stdout}{child.stderr}')\n")
    monkeypatch.chdir(tmp_path)
    load_builder.cache_clear()
    assert callable(load_builder("script.py:build"))
    code, said = (tmp_path / "child.txt").read_text().split("\n", 1)
    assert code == "2" and "started while importing --model script.py:build" in " ".join(said.split()), said
    assert "if __name__ ==" in said and "Traceback" not in said
    assert IMPORTING_MODEL not in os.environ  # unset once the import is done

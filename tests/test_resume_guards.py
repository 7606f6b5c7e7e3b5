"""Resume guards: a checkpoint is resumed only into the run it belongs to (same data, teacher, recipe,
starting weights) and only when its bytes are the ones written; what a killed write leaves is cleaned up,
and every refusal says what to do."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from cli_helpers import run_cli
from jointcompress import RecipeError, TrainingError, compress
from jointcompress.checkpoint import CheckpointStore, read_checkpoint
from jointcompress.data import evaluator
from jointcompress.errors import DataError, JointCompressError

PRUNE = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5}],
         "training": {"epochs": 1, "batch_size": 128}}
DISTIL = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5},
                         {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5, "cache_teacher": True}],
          "training": {"epochs": 1, "batch_size": 128}}


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def _run(digits, run_dir, recipe=PRUNE, data=None, teacher=None, **kw):
    data = data if data is not None else (digits.x_train, digits.y_train)
    model = copy.deepcopy(teacher) if teacher is not None else _net()
    return compress(model, recipe, data, evaluator(digits.x_test, digits.y_test), teacher=teacher, run_dir=run_dir, **kw)


def test_resume_with_other_data_of_the_same_size_is_refused(digits, tmp_path):
    """Only the step count was checked: shuffled labels (or other images) resumed, and distillation read the
    teacher outputs cached for the old samples."""
    _run(digits, tmp_path, checkpoint_every=4)
    shuffled = digits.y_train[torch.randperm(len(digits.y_train), generator=torch.Generator().manual_seed(3))]
    with pytest.raises(DataError, match=r"trained on other data .*the same --data.*--force"):
        _run(digits, tmp_path, data=(digits.x_train, shuffled), resume=True)
    _run(digits, tmp_path, resume=True)  # the same data resumes
    meta = read_checkpoint(CheckpointStore(tmp_path).paths()[-1])["meta"]
    assert len(meta["data_sha256"]) == 64 and meta["data_shape"] == f"x {tuple(digits.x_train.shape)} float32, y ({len(digits.y_train)},) int64"


def test_checkpoints_without_input_digests_and_loaders_are_not_checked(digits, tmp_path, monkeypatch):
    import jointcompress.api as api

    monkeypatch.setattr(api, "run_inputs", lambda data, teacher: {})  # what an older version wrote
    _run(digits, tmp_path, checkpoint_every=4)
    monkeypatch.undo()
    assert "data_sha256" not in read_checkpoint(CheckpointStore(tmp_path).paths()[-1])["meta"]
    _run(digits, tmp_path, data=(digits.x_train, digits.y_train.flip(0)), resume=True)
    assert api.run_inputs(torch.utils.data.TensorDataset(digits.x_train, digits.y_train), None) == {}


def test_resume_with_another_teacher_is_refused(digits, tmp_path):
    """The CLI guards its starting weights with start.json; compress(resume=True) took any teacher."""
    teacher = _net(0)
    _run(digits, tmp_path, recipe=DISTIL, teacher=teacher, checkpoint_every=4)
    with pytest.raises(TrainingError, match=r"distilled from another teacher .*--force"):
        _run(digits, tmp_path, recipe=DISTIL, teacher=_net(1), resume=True)
    _run(digits, tmp_path, recipe=DISTIL, teacher=teacher, resume=True)


def test_a_refused_recipe_names_the_fields_that_differ(digits, tmp_path):
    _run(digits, tmp_path)
    other = {"name": "renamed", "techniques": [{**PRUNE["techniques"][0], "sparsity": 0.6}], "training": PRUNE["training"]}
    with pytest.raises(RecipeError) as err:
        _run(digits, tmp_path, recipe=other, resume=True)
    assert "name: 'recipe' in the checkpoint, 'renamed' now" in str(err.value)
    assert "techniques[0].sparsity: 0.5 in the checkpoint, 0.6 now" in str(err.value)


def _flip(path):
    data = bytearray(path.read_bytes())
    for i in range(20):
        data[len(data) // 2 + i * 97] ^= 0x55
    path.write_bytes(bytes(data))


def test_a_checkpoint_damaged_in_place_is_skipped_like_a_truncated_one(digits, tmp_path):
    """torch.load does not check the zip's CRCs: flipped bytes loaded, and the run went on from corrupt state."""
    _run(digits, tmp_path, checkpoint_every=4)
    paths = CheckpointStore(tmp_path).paths()
    _flip(paths[-1])
    with pytest.warns(UserWarning, match=rf"resuming from .*{paths[-2].name}.*do not match the checksum"):
        res = _run(digits, tmp_path, resume=True)
    assert res.history.events[0] == {"event": "resumed", "step": int(paths[-2].name[5:14]), "checkpoint": paths[-2].name}
    paths = CheckpointStore(tmp_path).paths()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(
        [p.name for p in paths] + [p.name + ".sha256" for p in paths])  # rotation removed the old sidecars too


def test_a_checkpoint_without_a_sidecar_loads_unchecked(digits, tmp_path):
    _run(digits, tmp_path, checkpoint_every=4)
    newest = CheckpointStore(tmp_path).paths()[-1]
    (tmp_path / "checkpoints" / (newest.name + ".sha256")).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_checkpoint(newest)["meta"]["position"]["step"] == 11


def test_force_removes_sidecars_and_leftovers(tmp_path):
    from jointcompress.io import prepare_run_dir

    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for name in ("ckpt-000000004.pt", "ckpt-000000004.pt.sha256", ".ckpt-000000008.pt.x1.tmp", "mine.pt"):
        (ck / name).write_bytes(b"x")
    prepare_run_dir(tmp_path, force=True, resume=False)
    assert [p.name for p in ck.iterdir()] == ["mine.pt"]


class _Obj:
    pass


def test_no_loadable_checkpoint_says_what_to_do_and_never_suggests_unpickling(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    torch.save({"x": _Obj()}, ck / "ckpt-000000004.pt")
    with pytest.raises(TrainingError) as err:
        CheckpointStore(tmp_path).latest()
    text = str(err.value)
    assert "weights_only" not in text and "trust" not in text and "arbitrary code" not in text, text
    assert "pickled objects" in text and "--force" in text and "another --out" in text, text


def test_killed_checkpoint_writes_leave_no_temporary_files(digits, tmp_path):
    ck = tmp_path / "checkpoints"
    _run(digits, tmp_path, checkpoint_every=4)
    left = [".ckpt-000000008.pt.a1b2c3.tmp", ".ckpt-000000008.pt.sha256.zz.tmp", "ckpt-000000001.pt.sha256"]
    for name in left:
        (ck / name).write_bytes(b"half")
    (ck / ".mine.tmp").write_bytes(b"user")
    _run(digits, tmp_path, resume=True)
    names = {p.name for p in ck.iterdir()}
    assert not names & set(left) and ".mine.tmp" in names, names


def test_a_full_disk_names_the_file_and_says_the_old_one_is_intact(tmp_path, monkeypatch):
    from jointcompress.io import atomic_write_bytes

    target = tmp_path / "summary.json"
    atomic_write_bytes(target, b"old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"new")
    assert err.value.errno == 28 and str(target) in str(err.value) and "previous summary.json is intact" in str(err.value)
    with pytest.raises(OSError) as err:  # said the checkpoints before were intact where there were none
        CheckpointStore(tmp_path).save(3, {}, {})
    assert "ckpt-000000003.pt" in str(err.value) and "no checkpoint was written before this one" in str(err.value)
    assert target.read_bytes() == b"old" and not list((tmp_path / "checkpoints").iterdir())
    monkeypatch.undo()
    CheckpointStore(tmp_path).save(2, {}, {})
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError) as err:
        CheckpointStore(tmp_path).save(3, {}, {})
    assert "the 1 checkpoint(s) written before are intact" in str(err.value) and "resume the run" in str(err.value)


# -- the command line's starting weights (start.json, teacher.safetensors) -----------------------------------------

@pytest.fixture(scope="module")
def lenet_files(tmp_path_factory):
    from safetensors.torch import save_file

    from jointcompress.models import LeNet300

    d = tmp_path_factory.mktemp("w")
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        save_file(LeNet300(64, 10).state_dict(), str(d / f"{name}.safetensors"))
    return d / "a.safetensors", d / "b.safetensors"


def _recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: lenet300\ndata: digits\ntraining: {epochs: 1}\ntechniques: [{type: quant_lsq, bits: 4}]\n")
    return p


def test_a_run_killed_before_start_json_still_refuses_other_weights(tmp_path, monkeypatch, capsys, lenet_files):
    """Killed between teacher.safetensors and start.json, every --resume loaded the trained model, returned
    before the check, never wrote start.json and accepted other --weights."""
    a, b = lenet_files
    out = tmp_path / "o"
    out.mkdir()
    (out / "teacher.safetensors").write_bytes(a.read_bytes())  # what the older order left
    code, text = run_cli(monkeypatch, capsys, "compress", _recipe(tmp_path), "--out", out, "--resume", "--weights", b)
    assert code == 2 and "began from the model it trained first" in text and "holds other weights" in text, text
    code, text = run_cli(monkeypatch, capsys, "compress", _recipe(tmp_path), "--out", out, "--resume")
    assert not code and json.loads((out / "start.json").read_text())["weights"] is None, text
    code, text = run_cli(monkeypatch, capsys, "compress", _recipe(tmp_path), "--out", out, "--resume", "--weights", b)
    assert code == 2 and "holds other weights" in text, text


def test_start_json_is_written_before_the_trained_model(tmp_path, monkeypatch, capsys):
    import jointcompress.io as jio

    written, real = [], jio.atomic_write_bytes
    monkeypatch.setattr(jio, "atomic_write_bytes", lambda p, d: (written.append(os.path.basename(p)), real(p, d))[1])
    code, text = run_cli(monkeypatch, capsys, "compress", _recipe(tmp_path), "--out", tmp_path / "o", "--teacher-epochs", "1")
    assert not code, text
    assert written.index("start.json") < written.index("teacher.safetensors"), written


def test_a_damaged_trained_model_of_the_run_says_to_delete_it(tmp_path, monkeypatch, capsys, lenet_files):
    out = tmp_path / "o"
    out.mkdir()
    (out / "teacher.safetensors").write_bytes(lenet_files[0].read_bytes()[:100])
    code, text = run_cli(monkeypatch, capsys, "compress", _recipe(tmp_path), "--out", out, "--resume")
    assert code == 2 and "delete the file and --resume trains it again" in text, text
    assert "give a .safetensors file" not in text, text


def test_the_command_line_shows_a_full_disk_once_with_the_file(tmp_path, monkeypatch, capsys):
    import jointcompress.pipeline as pipeline
    from jointcompress.io import atomic_write_bytes

    def full(*args, **kwargs):
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        atomic_write_bytes(tmp_path / "out.json", b"{}")

    monkeypatch.setattr(pipeline, "load_split", full)
    code, text = run_cli(monkeypatch, capsys, "compress", _recipe(tmp_path), "--out", tmp_path / "o")
    assert code == 1 and f"writing {tmp_path / 'out.json'} failed: No space left on device; no out.json was written" in text
    assert text.count(str(tmp_path / "out.json")) == 1, text


def test_a_trained_model_that_no_longer_fits_the_builder_names_the_builder(tmp_path):
    """A builder edited between an interrupt and --resume: the advice was to delete the trained model's file, after
    which the resume blamed non-repeatable training and asked for the file just deleted."""
    import torch.nn as nn
    from safetensors.torch import save_file

    from jointcompress.cli import _trained_before
    from jointcompress.errors import ArtifactError

    teacher_file = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in nn.Linear(4, 32).state_dict().items()}, str(teacher_file))
    with pytest.raises(ArtifactError, match="does not fit the model the builder makes now .*the builder changed since"):
        _trained_before(lambda: nn.Linear(4, 48), teacher_file)
    teacher_file.write_bytes(b"damaged")
    with pytest.raises(ArtifactError, match="cannot be used .*delete the file and --resume trains it again"):
        _trained_before(lambda: nn.Linear(4, 48), teacher_file)


def test_force_starts_over_with_its_own_start_and_trained_model(tmp_path, monkeypatch, capsys):
    """--force kept the earlier run's start.json and trained model and never rewrote them: the new run,
    once interrupted, could be resumed by no command (its --teacher-epochs refused, the old one too)."""
    out = tmp_path / "o"
    code, text = run_cli(monkeypatch, capsys, "compress", _recipe(tmp_path), "--out", out, "--teacher-epochs", "1")
    assert not code, text
    first = (out / "teacher.safetensors").read_bytes()
    code, text = run_cli(monkeypatch, capsys, "compress", _recipe(tmp_path), "--out", out, "--teacher-epochs", "2", "--force")
    assert not code, text
    assert json.loads((out / "start.json").read_text())["teacher_epochs"] == 2
    assert (out / "teacher.safetensors").read_bytes() != first


@contextlib.contextmanager
def _held_by_another(folder):
    """`folder`'s run lock held as another process holds it (a second open file locks apart), with pid 4242."""
    from jointcompress.io import LOCK_NAME

    fcntl = pytest.importorskip("fcntl")  # the run lock is fcntl's: nothing is locked without it (Windows)
    with open(folder / LOCK_NAME, "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("4242\n")
        other.flush()
        yield


def test_a_second_run_in_a_folder_in_use_is_refused_naming_the_first(tmp_path):
    """Two runs given one --out wrote the same checkpoint names and deleted each other's temporary files."""
    from jointcompress.errors import JointCompressError
    from jointcompress.io import check_output_dir, prepare_run_dir

    out = tmp_path / "o"
    out.mkdir()
    with _held_by_another(out):
        with pytest.raises(JointCompressError, match=r"in use by another jointcompress run \(pid 4242\)"):
            prepare_run_dir(out, force=False, resume=False)
    check_output_dir(out)  # the lock file alone is no run's output: the folder still counts as empty
    assert prepare_run_dir(out, force=False, resume=False) == out
    assert prepare_run_dir(out, force=True, resume=False) == out  # this process holds it already


def test_a_killed_writes_temporary_files_in_the_folder_are_removed(tmp_path):
    """A run killed mid-write left `.teacher.safetensors.*.tmp` (the size of the model) through --resume and --force."""
    from jointcompress.io import prepare_run_dir

    out = tmp_path / "o"
    out.mkdir()
    for name in (".teacher.safetensors.x1y2.tmp", ".start.json.ab12.tmp", "notes.txt", ".mine.tmp"):
        (out / name).write_text("x")
    (out / "checkpoints").mkdir()
    prepare_run_dir(out, force=False, resume=True)
    assert sorted(p.name for p in out.iterdir()) == [".jointcompress.lock", ".mine.tmp", "checkpoints", "notes.txt"]


def test_a_builder_whose_code_changed_without_a_shape_is_refused_on_resume(tmp_path, monkeypatch, capsys):
    """ReLU changed to GELU in the builder between a run and its --resume: the weights (and their digest) were
    the same, and the run resumed into a model trained half one way and half the other, without a word."""
    builder = tmp_path / "net.py"
    source = ("import torch.nn as nn\n\n\ndef build():\n"
              "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.{act}, nn.Linear(32, 10))\n")
    builder.write_text(source.format(act="ReLU()"))
    out, args = tmp_path / "o", ["compress", _recipe(tmp_path), "--model", f"{builder}:build", "--teacher-epochs", "1"]
    code, text = run_cli(monkeypatch, capsys, *args, "--out", out)
    assert not code, text
    assert len(json.loads((out / "start.json").read_text())["probe_outputs"]) == 8
    from jointcompress.models import load_builder

    builder.write_text(source.format(act="GELU(approximate='tanh')"))  # another length: no stale bytecode
    load_builder.cache_clear()  # as a new process starts
    code, text = run_cli(monkeypatch, capsys, *args, "--out", out, "--resume")
    assert code == 2 and "gives other outputs on its first 8 training rows" in text and "builder's code changed" in text, text


def test_a_trained_model_damaged_in_place_is_named_as_damaged(tmp_path, monkeypatch, capsys):
    """Still a valid safetensors file with other values: the refusal said the model was trained again and
    advised another builder or --weights; nothing was trained, the file changed."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "o"
    code, text = run_cli(monkeypatch, capsys, "compress", _recipe(tmp_path), "--out", out, "--teacher-epochs", "1")
    assert not code, text
    state = load_file(str(out / "teacher.safetensors"))
    first = next(iter(state))
    state[first] = state[first] + 1.0
    save_file(state, str(out / "teacher.safetensors"))
    code, text = run_cli(monkeypatch, capsys, "compress", _recipe(tmp_path), "--out", out, "--teacher-epochs", "1",
                         "--resume")
    assert code == 2 and "teacher.safetensors no longer holds it (damaged" in text and "--resume trains it again" in text, text
    assert "trained again differs" not in text


def test_other_training_data_on_resume_is_named_as_the_data_not_the_builder(tmp_path, monkeypatch, capsys):
    """The same images in another order, given to --resume: the outputs on the first rows changed, and the run
    said the builder's code had changed since, where the builder was untouched."""
    from jointcompress.data import _digits_arrays

    x, y = _digits_arrays()
    np.savez(tmp_path / "a.npz", x_train=x[:1000], y_train=y[:1000], x_test=x[1000:], y_test=y[1000:])
    np.savez(tmp_path / "b.npz", x_train=x[:1000][::-1], y_train=y[:1000][::-1], x_test=x[1000:], y_test=y[1000:])
    out, args = tmp_path / "o", ["compress", _recipe(tmp_path), "--teacher-epochs", "1"]
    code, text = run_cli(monkeypatch, capsys, *args, "--data", tmp_path / "a.npz", "--out", out)
    assert not code, text
    code, text = run_cli(monkeypatch, capsys, *args, "--data", tmp_path / "b.npz", "--out", out, "--resume")
    flat = " ".join(text.split())
    assert code == 2 and "the first 8 training images differ" in flat and "builder" not in flat, text


def test_another_test_split_on_resume_is_refused(tmp_path, monkeypatch, capsys):
    """Resumed with half the test images, the run went on without a word: its history mixed epochs read on two
    sets, and the kept epoch was chosen across them."""
    from jointcompress.data import _digits_arrays

    x, y = _digits_arrays()
    np.savez(tmp_path / "a.npz", x_train=x[:1000], y_train=y[:1000], x_test=x[1000:], y_test=y[1000:])
    np.savez(tmp_path / "b.npz", x_train=x[:1000], y_train=y[:1000], x_test=x[1000:1200], y_test=y[1000:1200])
    out, args = tmp_path / "o", ["compress", _recipe(tmp_path), "--teacher-epochs", "1"]
    code, text = run_cli(monkeypatch, capsys, *args, "--data", tmp_path / "a.npz", "--out", out)
    assert not code, text
    code, text = run_cli(monkeypatch, capsys, *args, "--data", tmp_path / "a.npz", "--out", out, "--resume")
    assert not code, text  # the same data resumes
    code, text = run_cli(monkeypatch, capsys, *args, "--data", tmp_path / "b.npz", "--out", out, "--resume")
    assert code == 2 and "evaluates on" in text and "differ from those it began with" in " ".join(text.split()), text


def test_the_data_fingerprint_tells_other_data_but_not_rounding():
    """A resume on another machine normalizes the same images with a mean summed in another order: an exact
    digest refused it. The fingerprint takes rounding and tells other rows, another order or another shape."""
    from jointcompress.data import fingerprint, same_fingerprint

    x = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(50) % 10
    recorded = fingerprint([x, y, None])
    assert same_fingerprint(recorded, fingerprint([x * (1 + 1e-7), y, None]))
    for other in ([x.flip(0), y, None], [x[:40], y[:40], None], [x, y.roll(1), None], [x + 0.01, y, None], [x, y, x]):
        assert not same_fingerprint(recorded, fingerprint(other))


def test_a_refused_command_removes_only_the_empty_folders_it_made(tmp_path):
    """io.removed_if_refused: the folders a refused command created go while they hold nothing but the run lock
    this process holds (which it gives up); a folder that was there, or one that holds a file, stays."""
    from jointcompress.io import _HELD_LOCKS, prepare_run_dir, removed_if_refused

    @removed_if_refused
    def refused(out, write=None):
        prepare_run_dir(out, force=False, resume=False)
        if write:
            (out / write).write_text("kept")
        raise RuntimeError("refused")

    for out, write in ((tmp_path / "a" / "b", None), (tmp_path / "c", "notes.txt")):
        with pytest.raises(RuntimeError):
            refused(out=out, write=write)
    assert not (tmp_path / "a").exists() and str((tmp_path / "a" / "b").resolve()) not in _HELD_LOCKS
    assert (tmp_path / "c" / "notes.txt").read_text() == "kept"
    there = tmp_path / "there"
    there.mkdir()
    with pytest.raises(RuntimeError):
        refused(out=there)
    assert there.is_dir()


def test_compress_in_a_run_dir_another_run_holds_is_refused_and_its_own_lock_is_given_up(digits, tmp_path):
    """compress(run_dir=...) took no lock (only the command line did): a job started twice on one run_dir deleted
    the other's temporary checkpoint files and resumed from its live checkpoints. The lock is held while the run
    lasts and given up after, so a later run (another process's too) may use the folder."""
    from jointcompress.errors import JointCompressError
    from jointcompress.io import LOCK_NAME

    fcntl = pytest.importorskip("fcntl")
    held = tmp_path / "held"
    held.mkdir()
    with _held_by_another(held):
        with pytest.raises(JointCompressError, match=r"in use by another jointcompress run \(pid 4242\)"):
            _run(digits, held, resume=True)
    assert not CheckpointStore(held).paths()
    mine = tmp_path / "mine"
    _run(digits, mine)
    assert not (mine / LOCK_NAME).exists()  # given up, and its file removed, once compress() returned
    with open(mine / LOCK_NAME, "a+") as later:
        fcntl.flock(later, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_second_compare_in_a_folder_a_compare_holds_is_refused(tmp_path, monkeypatch, capsys):
    """compare took no lock: a second compare given the same --out overwrote the first's compare.json, and with
    --force deleted the first's finished point folders while it ran."""
    from jointcompress.recipe import builtin_recipe

    out = tmp_path / "cmp"
    out.mkdir()
    with _held_by_another(out):
        for force in ((), ("--force",)):  # before the first compare's first point ends, its folder is empty
            code, said = run_cli(monkeypatch, capsys, "compare", builtin_recipe("demo"), "--variants", "sequential",
                                 "--seeds", "1", "--ratios", "20", "--out", out, *force)
            assert code == 2 and "in use by another jointcompress run (pid 4242)" in said, said
            (out / "runs" / "sequential-r20-s0").mkdir(parents=True, exist_ok=True)  # then it has finished one
        assert (out / "runs" / "sequential-r20-s0").is_dir()


def test_a_resume_given_another_model_or_data_names_the_flag(tmp_path, monkeypatch, capsys):
    """--resume with --data or --model other than the run's was refused saying "the builder changed since the run
    began; set it back", of a builder the user never touched."""
    from jointcompress.data import load_digits

    out = tmp_path / "o"
    code, text = run_cli(monkeypatch, capsys, "compress", _recipe(tmp_path), "--out", out, "--teacher-epochs", "1")
    assert not code, text
    assert {k: json.loads((out / "start.json").read_text())[k] for k in ("model", "data")} == {"model": "lenet300",
                                                                                              "data": "digits"}
    digits, big = load_digits(), tmp_path / "big.npz"
    pad = lambda x: np.pad(x.numpy()[:, 0], ((0, 0), (10, 10), (10, 10)))  # noqa: E731  28x28 images
    np.savez(big, x_train=pad(digits.x_train), y_train=digits.y_train.numpy(), x_test=pad(digits.x_test),
             y_test=digits.y_test.numpy())
    for flag, value, began in (("--data", big, "data digits"), ("--model", "lenet5", "model lenet300")):
        code, text = run_cli(monkeypatch, capsys, "compress", _recipe(tmp_path), "--out", out, "--resume", flag, value,
                             "--teacher-epochs", "1")
        said = " ".join(text.split())
        assert code == 2 and f"began with {began}, and this command gives" in said and "builder" not in text, text
        assert f"({flag}, or the recipe's `{flag[2:]}:`)" in said  # the recipe's field may have changed, not a flag
    code, text = run_cli(monkeypatch, capsys, "compress", _recipe(tmp_path), "--out", tmp_path / "o2", "--data", big,
                         "--teacher-epochs", "1")
    assert not code and json.loads((tmp_path / "o2" / "start.json").read_text())["data"] == str(big)  # a --data to pass


def test_compare_under_torchrun_is_refused_before_it_writes_anything(tmp_path, monkeypatch, capsys):
    """Under torchrun every rank wrote the folder and its points: rank 0 found rank 1's compare.json and refused
    its own fresh --out, and with --force a rank's artifact write failed midway in a gloo traceback."""
    from jointcompress.recipe import builtin_recipe

    monkeypatch.setenv("WORLD_SIZE", "2")
    code, said = run_cli(monkeypatch, capsys, "compare", builtin_recipe("demo"), "--variants", "sequential", "--seeds",
                         "1", "--ratios", "20", "--out", tmp_path / "cmp")
    assert code == 2 and "compare runs in one process: start it without torchrun" in said, said
    assert not (tmp_path / "cmp").exists()


def test_a_run_lock_is_not_held_by_the_children_of_a_killed_run(tmp_path):
    """DataLoader workers forked by a run share its lock file: killed, the run left them orphaned and holding the
    lock for seconds, and the resume started at once was refused, naming the dead run's pid."""
    import subprocess
    import sys

    fcntl = pytest.importorskip("fcntl")
    from jointcompress.io import LOCK_NAME

    script = tmp_path / "forks.py"
    script.write_text(
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from jointcompress.io import hold_run_lock\n"
        "hold_run_lock(Path(sys.argv[1]))\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(30)\n"
        "    os._exit(0)\n"
        "Path(sys.argv[1], 'child').write_text(str(child))\n"
        "os._exit(0)  # the run dies; its worker lives on\n")
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = int((tmp_path / "child").read_text())
    try:
        with open(tmp_path / LOCK_NAME, "a+") as resumed:
            fcntl.flock(resumed, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raised BlockingIOError while the child lived
    finally:
        os.kill(child, 9)


def test_resume_of_a_finished_run_with_an_edited_recipe_is_refused_by_the_field(tmp_path, monkeypatch, capsys):
    """A job script that edited its recipe and always passed --resume read "nothing to continue" and exit status 0
    when the run had finished: the new recipe never ran, without a word. The same recipe resumes to that message
    still (a flag the run was given, given again, included); another one is refused by its first field."""
    recipe = _recipe(tmp_path)
    out, args = tmp_path / "o", ["compress", recipe, "--teacher-epochs", "1", "--mode", "overlap"]
    code, text = run_cli(monkeypatch, capsys, *args, "--out", out)
    assert not code, text
    code, text = run_cli(monkeypatch, capsys, *args, "--out", out, "--resume")
    assert not code and "has finished" in text, text
    code, text = run_cli(monkeypatch, capsys, "compress", recipe, "--teacher-epochs", "1", "--out", out, "--resume")
    assert code == 2 and "mode: 'overlap' in the finished run, 'joint' now" in " ".join(text.split()), text
    recipe.write_text(recipe.read_text().replace("bits: 4", "bits: 3"))
    code, text = run_cli(monkeypatch, capsys, *args, "--out", out, "--resume")
    flat = " ".join(text.split())
    assert code == 2 and "finished with another recipe (techniques[0].bits: 4 in the finished run, 3 now)" in flat, text
    assert "pass --force in place of --resume" in flat


def test_resume_of_a_finished_run_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """--resume of a finished run loaded its last checkpoint, finalized and saved the same artifact again, and added
    those seconds to summary.json's wall time, without saying there was nothing to continue."""
    out, args = tmp_path / "o", ["compress", _recipe(tmp_path), "--teacher-epochs", "1"]
    code, text = run_cli(monkeypatch, capsys, *args, "--out", out)
    assert not code, text
    written = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    code, text = run_cli(monkeypatch, capsys, *args, "--out", out, "--resume")
    assert not code and "has finished" in text and "pass --force in place of --resume" in " ".join(text.split()), text
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == written
    (out / "summary.json").unlink()  # as if killed while the results were written: the run is resumed and saved
    code, text = run_cli(monkeypatch, capsys, *args, "--out", out, "--resume")
    assert not code and "has finished" not in text and (out / "summary.json").is_file(), text


def test_force_refuses_to_delete_a_teacher_no_run_wrote(tmp_path):
    """A folder holding only the user's own teacher.safetensors (no start.json: a run writes that first): the
    --force a refusal advised deleted it."""
    from jointcompress.errors import JointCompressError
    from jointcompress.io import prepare_run_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "teacher.safetensors").write_bytes(b"my own weights")
    with pytest.raises(JointCompressError, match="has no start.json beside it, so no run wrote it"):
        prepare_run_dir(out, force=True, resume=False)
    assert (out / "teacher.safetensors").read_bytes() == b"my own weights"
    (out / "start.json").write_text("{}")  # a run's: --force clears what that run began from
    prepare_run_dir(out, force=True, resume=False)
    assert not (out / "teacher.safetensors").exists()


def test_a_run_lock_file_goes_when_its_process_exits_and_a_lock_file_unlinked_meanwhile_is_not_held(tmp_path):
    """Every folder a command-line run used kept its .jointcompress.lock after the run. The lock's file goes at a
    normal exit; a run that opened the file just before its holder removed it locks the file there now, not the
    removed one (two runs would each hold a lock on a different file)."""
    import subprocess
    import sys

    fcntl = pytest.importorskip("fcntl")
    from jointcompress import io

    script = "import sys; from pathlib import Path; from jointcompress.io import hold_run_lock; hold_run_lock(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60)
    assert not (tmp_path / io.LOCK_NAME).exists()

    real_open, stale = open, []

    def open_then_removed(path, *args, **kwargs):  # the holder removes the file right after this run opened it
        handle = real_open(path, *args, **kwargs)
        if not stale:
            stale.append(handle)
            Path(path).unlink()
        return handle

    folder = tmp_path / "raced"
    folder.mkdir()
    io.open = open_then_removed  # io's own name for the builtin, read at call time
    try:
        io.hold_run_lock(folder)
    finally:
        del io.open
    try:
        assert stale and stale[0].closed
        with open(folder / io.LOCK_NAME, "a+") as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        io.release_run_lock(folder)
    assert not (folder / io.LOCK_NAME).exists()

    def always_removed(path, *args, **kwargs):  # runs starting and ending here all the while: refused, not held
        handle = real_open(path, *args, **kwargs)
        Path(path).unlink()
        return handle

    io.open = always_removed
    try:
        with pytest.raises(JointCompressError, match="its run lock file kept being replaced"):
            io.hold_run_lock(folder)
    finally:
        del io.open
    assert str(folder.resolve()) not in io._HELD_LOCKS


def test_an_artifact_folder_that_cannot_be_created_is_said_with_its_path(tmp_path, monkeypatch):
    """Saving into a new folder under a read-only one raised the OS's bare PermissionError (a save straight into
    the read-only folder said which file failed and that nothing was written)."""
    import pathlib

    from jointcompress.artifact import save
    from jointcompress.finalize import finalize

    model = nn.Sequential(nn.Linear(4, 2))
    spec = finalize(model)
    real_mkdir = pathlib.Path.mkdir

    def refused(self, *args, **kwargs):
        if self.name == "art":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", refused)
    with pytest.raises(PermissionError) as err:
        save(model, spec, tmp_path / "art", example_inputs=torch.randn(1, 4))
    assert f"creating {tmp_path / 'art'} failed: Permission denied; nothing was written" in str(err.value)


def test_a_full_disk_while_the_artifact_is_written_says_the_run_resumes(tmp_path):
    """A full disk during the artifact's write said which file failed; a checkpoint's failed write also says that the
    checkpoints before it are intact and a resume continues. The artifact's now does too, where checkpoints exist."""
    from jointcompress.pipeline import _resumable_if_the_write_fails

    full = OSError(28, "writing out/artifact/weights.jcw failed: No space left on device; no weights.jcw was written",
                   "out/artifact/weights.jcw")
    with pytest.raises(OSError) as plain:  # no checkpoint: nothing to resume from, said as it was
        with _resumable_if_the_write_fails(tmp_path):
            raise full
    assert plain.value is full
    CheckpointStore(tmp_path).save(3, {}, {})
    with pytest.raises(OSError) as said:
        with _resumable_if_the_write_fails(tmp_path):
            raise full
    assert said.value.errno == 28 and "no weights.jcw was written; the run's training is done and its checkpoints are " \
                                      "intact: free space" in str(said.value) and "--resume" in str(said.value)

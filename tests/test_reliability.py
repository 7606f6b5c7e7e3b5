"""Non-finite steps roll back and stop with a clear error; bad recipes and data fail before
training; outputs are atomic and never silently overwritten; runs are byte-reproducible."""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn

from jointcompress import DataError, JointCompressError, RecipeError, TrainingError, compress, finalize
from jointcompress.checkpoint import CheckpointStore, read_checkpoint
from jointcompress.data import evaluator
from jointcompress.io import atomic_write_bytes, prepare_output_dir
from jointcompress.session import CompressionSession

RECIPE = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5}, {"type": "quant_lsq", "bits": 4}],
          "training": {"epochs": 1, "batch_size": 128}}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture
def poison(monkeypatch):
    """poison(steps): add a loss term 'poison' that is NaN at those steps (0 elsewhere)."""
    def install(steps):
        orig = CompressionSession.forward_terms

        def terms(self, batch):
            out = orig(self, batch)
            out["poison"] = out["task"] * (float("nan") if self.ctx.step in steps else 0.0)
            return out

        monkeypatch.setattr(CompressionSession, "forward_terms", terms)
    return install


def _run(digits, model=None, recipe=RECIPE, **kw):
    model = model or _model()
    return compress(model, recipe, (digits.x_train, digits.y_train), evaluator(digits.x_test, digits.y_test), **kw), model


def test_nan_loss_skips_the_step_rolls_back_and_halves_the_lr(digits, poison):
    poison({4})
    seen = {}

    class Spy:
        def on_step(self, trainer, step, out):
            seen[step] = (out.get("skipped", False), trainer.lr_scale, [g["lr"] for g in trainer.optimizer.param_groups])

    with pytest.warns(RuntimeWarning, match=r"skipped 1 non-finite step\(s\) \(step 4: .*'poison'.*ended at x0.5"):
        res, model = _run(digits, callbacks=[Spy()])  # and says so: it cost accuracy, and was only in history.json
    ev = [e for e in res.history.events if e["event"] == "nonfinite"]
    assert len(ev) == 1 and ev[0]["step"] == 4 and "'poison'" in ev[0]["what"] and ev[0]["rolled_back_to"] == 0
    assert seen[4][0] and seen[4][1] == 0.5 and not seen[5][0]
    assert seen[5][2][0] < 0.6 * seen[3][2][0]  # the LR after the rollback is half (times the cosine decay)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_rollback_restores_the_last_good_weights(digits, poison):
    poison({3})
    snap = {}

    class Spy:
        def on_step(self, trainer, step, out):
            if step == 3:
                snap["after"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
                snap["good"] = trainer.recovery.good["model"]

    _run(digits, callbacks=[Spy()])
    assert all(torch.equal(snap["after"][k], snap["good"][k]) for k in snap["good"])


def test_repeated_nan_stops_with_step_and_term_and_keeps_the_checkpoints(digits, poison, tmp_path):
    poison({6, 7, 8})
    with pytest.raises(TrainingError) as err:
        _run(digits, run_dir=tmp_path, checkpoint_every=2)
    msg = str(err.value)
    assert "step 8" in msg and "loss term 'poison' is nan" in msg and "max_nonfinite=3" in msg and "lr" in msg
    assert "is kept" in msg and "the kept checkpoint resumes only with this recipe" in msg
    # nothing saved is lost: the checkpoints from before the failures are complete and loadable
    # (a checkpoint written between failures holds the rolled-back, finite state)
    for p in CheckpointStore(tmp_path).paths():
        ck = read_checkpoint(p)
        assert ck["meta"]["position"]["step"] <= 8
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_nonfinite_gradient_names_the_parameter(digits):
    model = _model()
    model[3].bias.register_hook(lambda g: g * float("inf"))
    with pytest.raises(TrainingError, match=r"step 0: the gradient of parameter '3.bias' has") as err:
        _run(digits, model=model, recipe={"training": {"epochs": 1}}, max_nonfinite=1)
    assert "checkpoint" not in str(err.value)  # none was written before step 0: none is named as kept


def test_the_gradient_check_finds_any_non_finite_entry_and_passes_finite_ones_whose_norm_overflows():
    from jointcompress.training.recovery import all_finite

    params = [nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(()))]
    for p in params:
        p.grad = torch.ones_like(p)
    assert all_finite(params)
    for bad in (float("nan"), float("inf"), -float("inf")):
        params[1].grad[2, 3] = bad
        assert not all_finite(params)
        params[1].grad[2, 3] = 1.0
    params[0].grad.fill_(3e38)  # every entry finite, the norm not: the slow path decides
    assert not all_finite(params)
    session = type("S", (), {"coordinator": type("C", (), {"params": params})(), "param_names": {}})()
    from jointcompress.training.recovery import Recovery

    assert Recovery(session).bad_gradient() is None
    params[2].grad.fill_(float("nan"))
    assert "non-finite" in Recovery(session).bad_gradient()


def test_poisoned_batch_is_caught(digits):
    x = digits.x_train.clone()
    x[5] = float("nan")  # a DataLoader the user built: no check on the way in
    ds = torch.utils.data.TensorDataset(x, digits.y_train)
    dl = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False)
    with pytest.raises(TrainingError, match="step 0: loss term 'task' is nan"):
        compress(_model(), {"training": {"epochs": 1}}, dl, evaluator(digits.x_test, digits.y_test), max_nonfinite=1)
    # with the default max_nonfinite=3 the poisoned batch (once per epoch) is skipped and training goes on
    res = compress(_model(), {"training": {"epochs": 2}}, dl, evaluator(digits.x_test, digits.y_test))
    assert [e["step"] for e in res.history.events] == [0, len(dl)]


def test_targets_that_match_no_layer_name_the_technique_and_the_layers(digits):
    recipe = {"techniques": [{"type": "quant_lsq"}, {"type": "prune_unstructured", "sparsity": 0.5, "targets": ["encoder.*"]}]}
    with pytest.raises(RecipeError, match=r"techniques\[1\] \(prune_unstructured\).*select no layer.*1, 3"):
        _run(digits, recipe=recipe)
    with pytest.raises(RecipeError, match=r"techniques\[0\] \(quant_lsq\)"):
        _run(digits, recipe={"techniques": [{"type": "quant_lsq", "exclude": ["*"]}]})


def test_bad_data_is_a_clear_error(digits):
    ev = evaluator(digits.x_test, digits.y_test)
    with pytest.raises(DataError, match=r"cannot run on a batch of shape \(2, 1, 5, 5\)"):
        compress(_model(), {}, (torch.randn(20, 1, 5, 5), torch.zeros(20, dtype=torch.long)), ev)
    with pytest.raises(DataError, match=r"labels range over \[0, 12\].*10 outputs"):
        compress(_model(), {}, (digits.x_train, digits.y_train.clone().fill_(12).index_fill_(0, torch.tensor([0]), 0)), ev)
    x = digits.x_train.clone()
    x[3, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="1 input samples contain NaN"):
        compress(_model(), {}, (x, digits.y_train), ev)
    with pytest.raises(DataError, match="inputs but"):
        compress(_model(), {}, (digits.x_train, digits.y_train[:-1]), ev)


def test_dtypes_a_user_brings_are_read_or_named():
    """numpy's float64 and uint8 images name the dtype and the conversion (they were told to fix the
    shape); int32 class indices from a loader train (cross-entropy raised deep inside on them); a
    per-sample loss_fn names .mean() (float() raised 'only one element tensors ...')."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x[:, :3].argmax(1)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5}], "training": {"epochs": 1, "batch_size": 32}}

    def mlp():
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    for bad, dtype in ((x.double(), "float64"), ((x * 40 + 128).clamp(0, 255).to(torch.uint8), "uint8")):
        with pytest.raises(DataError, match=rf"batch of shape \(2, 8\) {dtype} .*x.float\(\)"):
            compress(mlp(), recipe, (bad, y), lambda m: 0.0)
    result = compress(mlp(), recipe, DataLoader(TensorDataset(x, y.int()), batch_size=32), lambda m: 0.0)
    assert result.history.epochs[-1]["losses"]["task"] > 0
    with pytest.raises(DataError, match=r"loss_fn returned a tensor of shape \(32,\).*\.mean\(\)"):
        compress(mlp(), recipe, (x, y), lambda m: 0.0, loss_fn=lambda out, b: F.cross_entropy(out, b[1], reduction="none"))


def test_float_token_ids_are_told_to_be_long_not_float():
    """Token ids as floats (a float array, a collate that cast them) into an embedding were told to give x.float(),
    which they already were."""
    torch.manual_seed(0)
    ids, y = torch.randint(0, 50, (32, 12)), torch.randint(0, 3, (32,))
    model = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(8 * 12, 3))
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 4}], "training": {"epochs": 1, "batch_size": 32}}
    with pytest.raises(DataError, match=r"has an embedding, which takes integer ids: give token ids as x.long\(\)"):
        compress(model, recipe, (ids.float(), y), lambda m: 0.0)
    assert compress(model, recipe, (ids, y), lambda m: 0.0).history.epochs[-1]["losses"]["task"] > 0


def test_float_targets_train_a_regressor_with_its_loss_and_are_named_without_one():
    """(x, y) with float y (regression): kept as floats, not truncated to class indices; the default
    cross-entropy refuses them with loss_fn named; NaN targets are refused like NaN inputs."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = torch.randn(128, 8)
    y = x[:, :1] * 0.7 + 0.25  # not integers: y.long() would make most of them 0
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5}],
              "training": {"epochs": 30, "batch_size": 32, "lr": 1e-2}}
    seen = []

    def mse(out, batch):
        seen.append(batch[1])
        return F.mse_loss(out, batch[1])

    result = compress(model, recipe, (x, y), lambda m: 0.0, loss_fn=mse)
    assert all(t.dtype == torch.float32 for t in seen) and any(not torch.equal(t, t.round()) for t in seen)
    with torch.no_grad():
        assert float(F.mse_loss(model(x), y)) < 0.1 * float(y.var())
    assert result.techniques[0].achieved_sparsity() == pytest.approx(0.5, abs=0.02)
    with pytest.raises(DataError, match=r"labels are floats of shape \(32, 1\).*loss_fn=lambda outputs, batch: F.mse_loss"):
        compress(nn.Sequential(nn.Linear(8, 1)), recipe, (x, y), lambda m: 0.0)
    bad = y.clone()
    bad[5] = float("nan")
    with pytest.raises(DataError, match="1 labels contain NaN or Inf"):
        compress(nn.Sequential(nn.Linear(8, 1)), recipe, (x, bad), lambda m: 0.0, loss_fn=mse)
    with pytest.raises(DataError, match="1 labels contain NaN or Inf"):  # one target per sample, 1-D
        compress(nn.Sequential(nn.Linear(8, 1)), recipe, (x, bad[:, 0]), lambda m: 0.0, loss_fn=mse)


def test_what_evaluate_returns_is_read_or_named(tmp_path):
    """A number, a 0-d tensor or a dict of them is read as floats (a tensor reached the history
    and the run's JSON as a tensor); None (a function without `return`) or a string is named with
    the fix, not a TypeError from inside float()."""
    import json

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x[:, :2].argmax(1)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5}], "training": {"epochs": 1, "batch_size": 32}}
    result = compress(nn.Sequential(nn.Linear(8, 2)), recipe, (x, y),
                      lambda m: {"accuracy": torch.tensor(0.75), "note": "held-out"}, run_dir=tmp_path / "run")
    assert result.metrics == {"accuracy": 0.75, "note": "held-out"} and type(result.metrics["accuracy"]) is float
    assert result.history.epochs[-1]["metrics"]["accuracy"] == 0.75
    assert json.dumps(result.history.epochs[-1]["metrics"])  # plain JSON
    for returned, shown in ((None, "returned None"), ("0.9", "returned '0.9'"), ({"accuracy": None}, "for 'accuracy'")):
        with pytest.raises(TrainingError, match=f"{shown}.*return a number or a dict of numbers"):
            compress(nn.Sequential(nn.Linear(8, 2)), recipe, (x, y), lambda m, r=returned: r)


def _two_artifacts(digits, teacher, tmp_path):
    from jointcompress.artifact import save

    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.8, "scope": "global", "end": 0.5},
                             {"type": "quant_lsq", "bits": 4, "start": 0.3},
                             {"type": "distill_kd", "cache_teacher": True}],
              "training": {"epochs": 1, "batch_size": 64}, "coordination": {"strategy": "pcgrad", "every": 3}}
    out = []
    for i in range(2):
        model = copy.deepcopy(teacher)
        res = compress(model, recipe, (digits.x_train, digits.y_train), evaluator(digits.x_test, digits.y_test), teacher=teacher)
        spec = finalize(model, res.example_inputs, recipe=res.recipe.model_dump())
        save(model, spec, tmp_path / str(i), example_inputs=res.example_inputs)
        out.append({p.name: p.read_bytes() for p in sorted((tmp_path / str(i)).iterdir())})
    return out


def test_same_seed_same_data_gives_identical_tensors_and_manifest(digits, digits_teacher, tmp_path):
    import json

    from jointcompress.artifact import container

    a, b = _two_artifacts(digits, digits_teacher, tmp_path)
    assert container.unpack(a["weights.jcw"]) == container.unpack(b["weights.jcw"])
    ma, mb = json.loads(a["manifest.json"]), json.loads(b["manifest.json"])
    ma.pop("weights_sha256"), mb.pop("weights_sha256")
    assert ma == mb


def test_same_seed_same_data_gives_a_byte_identical_artifact(digits, digits_teacher, tmp_path):
    a, b = _two_artifacts(digits, digits_teacher, tmp_path)
    assert a.keys() == {"manifest.json", "weights.jcw"}
    assert a == b


def test_output_dir_is_never_silently_overwritten(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(JointCompressError, match="--force"):
        prepare_output_dir(tmp_path)
    assert (tmp_path / "old.txt").read_text() == "keep me"
    assert prepare_output_dir(tmp_path, force=True) == tmp_path
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(JointCompressError, match="is a file"):
        prepare_output_dir(f, force=True)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_bytes(target, b"old")

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new and half-written")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["summary.json"]


def test_checkpoint_write_failure_leaves_previous_checkpoints_intact(digits, tmp_path, monkeypatch):
    _run(digits, run_dir=tmp_path, checkpoint_every=4)
    before = {p.name: p.read_bytes() for p in CheckpointStore(tmp_path).paths()}
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        _run(digits, run_dir=tmp_path / "other", checkpoint_every=4)
    assert {p.name: p.read_bytes() for p in CheckpointStore(tmp_path).paths()} == before
    assert not [p for p in (tmp_path / "other" / "checkpoints").iterdir()]


def test_a_checkpoint_path_too_long_for_the_file_system_says_to_shorten_it(digits, tmp_path, monkeypatch):
    """A 4,000-character --out trained, then failed at its first checkpoint advising to free space."""
    import errno

    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENAMETOOLONG, "File name too long")))
    with pytest.raises(OSError, match="longer than the file system allows: give a shorter --out") as err:
        _run(digits, run_dir=tmp_path / "run", checkpoint_every=4)
    assert "free space" not in str(err.value)


def test_a_stream_without_length_is_named_and_one_with_length_trains():
    from torch.utils.data import DataLoader, IterableDataset

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x[:, :3].argmax(1)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    class SizedStream(Stream):
        def __len__(self):
            return len(y)

    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5}], "training": {"epochs": 2, "batch_size": 16}}
    with pytest.raises(DataError, match="DataLoader over Stream, which has no __len__.*give the dataset a __len__"):
        compress(nn.Sequential(nn.Linear(8, 3)), recipe, DataLoader(Stream(), batch_size=16), lambda m: 0.0)
    result = compress(nn.Sequential(nn.Linear(8, 3)), recipe, DataLoader(SizedStream(), batch_size=16), lambda m: 0.0)
    assert result.history.epochs[-1]["step"] == 8 and result.techniques[0].achieved_sparsity() == pytest.approx(0.5, abs=0.05)


def test_a_dataset_is_batched_at_the_recipes_batch_size():
    """A Dataset given as it is was refused ('pass a DataLoader ...'); it is batched at
    training.batch_size and shuffled by the run's seed, as a pair of tensors is."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x[:, :3].argmax(1)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5}], "training": {"epochs": 2, "batch_size": 16}}
    result = compress(nn.Sequential(nn.Linear(8, 3)), recipe, TensorDataset(x, y), lambda m: 0.0)
    assert result.history.epochs[-1]["step"] == 8  # 64 samples / 16 a batch, two epochs


def test_resume_with_nothing_to_continue_does_not_overwrite_a_finished_runs_files(tmp_path):
    """--resume into a folder with no checkpoint started a run over the user's summary, history, recipe and
    artifact; without --resume the same folder was refused."""
    from jointcompress.errors import JointCompressError
    from jointcompress.io import prepare_run_dir

    (tmp_path / "summary.json").write_text('{"mine": 1}')
    with pytest.raises(JointCompressError, match=r"holds no checkpoint to continue, and summary\.json that a new run"):
        prepare_run_dir(tmp_path, force=False, resume=True)
    assert (tmp_path / "summary.json").read_text() == '{"mine": 1}'
    killed_early = tmp_path / "early"
    killed_early.mkdir()
    (killed_early / "teacher.safetensors").write_bytes(b"x")  # what a run killed before its first checkpoint leaves
    with pytest.warns(UserWarning, match="starts from the beginning"):
        prepare_run_dir(killed_early, force=False, resume=True)


def test_force_removes_the_old_runs_checkpoints_only(tmp_path):
    """--force removed the whole checkpoints folder, the user's own files in it too."""
    from jointcompress.io import prepare_run_dir

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "ckpt-000000022.pt").write_bytes(b"old run")
    (ckpts / "my_resnet_epoch90.pt").write_bytes(b"mine")
    prepare_run_dir(tmp_path, force=True, resume=False)
    assert sorted(p.name for p in ckpts.iterdir()) == ["my_resnet_epoch90.pt"]


def test_force_removes_the_old_runs_results_too(tmp_path):
    """A --force restart stopped before its end left the old run's summary, recipe and artifact beside its own
    checkpoints: `report` then described the old run and `bench` measured its artifact, with no word."""
    from jointcompress.io import prepare_run_dir

    for name in ("summary.json", "history.json", "recipe.yaml", "teacher.safetensors", "notes.txt", "report.html", "layers.csv"):
        (tmp_path / name).write_text("old")
    (tmp_path / "artifact").mkdir()
    (tmp_path / "artifact" / "weights.jcw").write_bytes(b"old")
    prepare_run_dir(tmp_path, force=True, resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".jointcompress.lock", "notes.txt"]  # the model trained first too


def test_force_refuses_to_remove_a_run_folder_holding_the_users_files(tmp_path):
    """--force removed artifact/, hf_model/ and onnx/ whole, the user's own files in them too (their own onnx/ folder),
    though it promises the folder's other files stay: refused before anything is cleared, the files named; a folder
    holding a run's files only (a transformers run's model, tokenizer and ONNX files) is still cleared."""
    from jointcompress import JointCompressError
    from jointcompress.io import prepare_run_dir

    fresh = ("checkpoints", "summary.json", "artifact", "hf_model", "onnx")
    (tmp_path / "summary.json").write_text("old")
    for sub, names in (("artifact", ("weights.jcw", "manifest.json", ".previous.manifest.json")),
                       ("hf_model", ("config.json", "model.safetensors", "tokenizer.json", "modeling_pruned.py")),
                       ("onnx", ("model_fp32.onnx", "model_int8.onnx", "tokenizer_config.json"))):
        (tmp_path / sub).mkdir()
        for name in names:
            (tmp_path / sub / name).write_text("old")
    for name in ("resnet50.onnx", "notes.txt"):
        (tmp_path / "onnx" / name).write_text("mine")
    with pytest.raises(JointCompressError, match=r"onnx: --force removes this folder .* holds notes.txt, resnet50.onnx, "
                                                  r"which no run writes; move them out of the folder, or give another --out"):
        prepare_run_dir(tmp_path, force=True, resume=False, fresh=fresh)
    assert (tmp_path / "onnx" / "resnet50.onnx").is_file() and (tmp_path / "summary.json").is_file()  # nothing cleared
    assert (tmp_path / "artifact" / "weights.jcw").is_file()
    for name in ("resnet50.onnx", "notes.txt"):
        (tmp_path / "onnx" / name).unlink()
    prepare_run_dir(tmp_path, force=True, resume=False, fresh=fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".jointcompress.lock"]


def test_written_files_get_the_permissions_the_umask_gives(tmp_path):
    """mkstemp's 0600 survived the atomic rename: artifacts and summaries were unreadable to the group."""
    import os
    import stat

    from jointcompress.io import _umask, atomic_write_bytes

    atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o666 & ~_umask()
    before = os.umask(0o077)  # read at every write, not remembered from the first
    try:
        atomic_write_bytes(tmp_path / "b.json", b"{}")
    finally:
        os.umask(before)
    assert stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode) == 0o600


def test_weights_files_are_read_by_content_and_a_pickle_is_refused_without_unsafe_advice(tmp_path):
    """A safetensors file not named *.safetensors went to torch.load, whose error (quoted) advised
    weights_only=False; so did a file with a pickled object."""
    from safetensors.torch import save_file

    from jointcompress.errors import ArtifactError
    from jointcompress.pipeline import load_weights

    model = nn.Linear(3, 2)
    save_file(model.state_dict(), str(tmp_path / "w.bin"))
    assert torch.equal(load_weights(nn.Linear(3, 2), tmp_path / "w.bin").weight, model.weight)
    torch.save({"weight": model.weight.detach(), "extra": copy.copy}, tmp_path / "evil.pt")
    with pytest.raises(ArtifactError, match="holds pickled objects besides tensors") as caught:
        load_weights(nn.Linear(3, 2), tmp_path / "evil.pt")
    assert "weights_only=False" not in str(caught.value)


def test_a_file_that_is_no_torch_file_is_not_said_to_hold_pickles(tmp_path):
    import numpy as np

    from jointcompress.errors import ArtifactError
    from jointcompress.pipeline import load_weights

    np.save(tmp_path / "w.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ArtifactError, match="is not a torch file or a safetensors file"):
        load_weights(nn.Linear(3, 2), tmp_path / "w.npy")


def test_weights_a_user_brings_are_read_from_a_checkpoint_and_a_misfit_is_told_whole(tmp_path):
    """A text file named .pt was refused with "KeyError: 101"; a training checkpoint {'state_dict', 'epoch'} was refused
    as weights that do not fit; a shape mismatch was told in torch's message cut mid-sentence."""
    from jointcompress.errors import ArtifactError
    from jointcompress.pipeline import load_weights

    (tmp_path / "notes.pt").write_text("these are not weights\n")
    with pytest.raises(ArtifactError, match="is not a torch file .* or a safetensors file"):
        load_weights(nn.Linear(3, 2), tmp_path / "notes.pt")
    model = nn.Linear(3, 2)
    for extra in ({"epoch": 7, "lr": 0.1}, {"step": torch.tensor(5)}):  # a tensor of its own beside the weights too
        torch.save({"state_dict": model.state_dict(), **extra}, tmp_path / "ckpt.pt")
        with pytest.warns(UserWarning, match=r"a training checkpoint .*its weights are read from 'state_dict'"):
            assert torch.equal(load_weights(nn.Linear(3, 2), tmp_path / "ckpt.pt").weight, model.weight)
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ArtifactError, match=r"1 of another shape: weight \(2, 4\) where the model has \(2, 3\)\); is it the "
                                            r"same architecture"):
        load_weights(nn.Linear(3, 2), tmp_path / "other.pt")
    torch.save({"weight": model.weight.detach()}, tmp_path / "half.pt")
    with pytest.raises(ArtifactError, match=r"1 missing from the file: bias\)"):
        load_weights(nn.Linear(3, 2), tmp_path / "half.pt")


@pytest.mark.parametrize("keep, epoch", [("best", 1), ("last", 3)])
def test_training_keep_chooses_the_state_the_run_ends_with(keep, epoch):
    """keep: last ends with the last state at the target, whatever the evaluation read: no choice made on
    the data `evaluate` reads (the test split, where a comparison reports it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()
    states = []

    def evaluate(m):  # each epoch reads worse: "best" keeps the first (then the final reading after the run)
        states.append({k: v.clone() for k, v in m.state_dict().items()})
        return 0.9 - 0.1 * (len(states) - 1)

    recipe = {"training": {"epochs": 3, "batch_size": 16, "keep": keep},
              "techniques": [{"type": "quant_lsq", "bits": 8}]}
    result = compress(model, recipe, (x, y), evaluate)
    assert result.history.best_epoch == epoch
    kept = states[epoch - 1]
    assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())


def test_the_users_evaluate_reads_the_model_in_evaluation_mode():
    """A function that does not call model.eval() read the model with dropout on, and its batches moved the
    BatchNorm statistics the run keeps and stores; each module's mode is put back after."""
    torch.manual_seed(0)
    x, y = torch.randn(128, 20), torch.randint(0, 2, (128,))
    held_out = torch.randn(64, 20) * 5 + 10  # statistics far from the training data's
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5), torch.nn.Linear(32, 2))
    modes = []

    def evaluate(m):
        modes.append(m.training or any(layer.training for layer in m.modules()))
        with torch.no_grad():
            return {"accuracy": float((m(held_out).argmax(1) == 0).float().mean())}

    recipe = {"techniques": [{"type": "quant_lsq", "bits": 8}],
              "training": {"epochs": 2, "batch_size": 32, "recalibrate_norms": 0}}
    compress(model, recipe, (x, y), evaluate)
    assert len(modes) == 2 and not any(modes)  # the two epochs (the kept one's reading is the result's)
    with torch.no_grad():
        trained_on = model[0](x).mean(0)
    assert (model[1].running_mean - trained_on).abs().max() < 1.0  # the training data's, not the held-out's


def test_evaluation_images_the_model_cannot_take_are_named_before_training(digits):
    """The evaluator's data failed after the first epoch's training, with torch's message."""
    trained = []

    class Count:
        def on_step(self, trainer, step, out):
            trained.append(step)

    wrong = evaluator(torch.randn(10, 1, 5, 5), torch.zeros(10, dtype=torch.long))
    with pytest.raises(DataError, match=r"evaluation data: the model cannot run on a batch of shape \(2, 1, 5, 5\)"):
        compress(_model(), {}, (digits.x_train, digits.y_train), wrong, callbacks=[Count()])
    assert not trained


def test_an_evaluate_that_answers_every_attribute_is_called_as_given(digits):
    """The check of data.evaluator's images looked for any `sample_inputs` attribute: a Mock (or a proxy) has
    every attribute, and the run was refused before training."""
    from unittest import mock

    evaluate = mock.Mock(return_value={"accuracy": 0.5})
    compress(_model(), {"training": {"epochs": 1}}, (digits.x_train, digits.y_train), evaluate)
    assert evaluate.call_count == 1  # the epoch, whose reading is the result's


def test_tensors_of_a_model_of_two_inputs_are_told_the_dataset_that_takes_them():
    """((x1, x2), y) tensors were refused with "pass a tuple (x, y) of tensors", which they nearly were."""
    from torch.utils.data import StackDataset, TensorDataset

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

        def forward(self, x1, x2):
            return self.a(x1) + self.b(x2)

    torch.manual_seed(0)
    x1, x2, y = torch.randn(32, 3), torch.randn(32, 2), torch.randint(0, 4, (32,))
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 4}], "training": {"epochs": 1, "batch_size": 16}}
    with pytest.raises(DataError, match=r"StackDataset\(TensorDataset\(x1, x2\), y\)"):
        compress(TwoInputs(), recipe, ((x1, x2), y), lambda m: 0.0)
    result = compress(TwoInputs(), recipe, StackDataset(TensorDataset(x1, x2), y), lambda m: 0.0)
    assert result.history.epochs[-1]["losses"]["task"] > 0


def test_a_callback_without_hooks_or_with_another_signature_is_named_before_training():
    """A plain function passed as a callback was ignored without a word; a hook of another signature failed with a
    TypeError from inside the loop after training had begun."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    model = nn.Sequential(nn.Linear(8, 2))
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 8}], "training": {"epochs": 1, "batch_size": 16}}

    class Bad:
        def on_epoch(self, entry):
            pass

    class Good:
        seen = []

        def on_epoch(self, trainer, entry):
            self.seen.append(entry["epoch"])

    with pytest.raises(RecipeError, match=r"callbacks: <function .* has none of the hooks the loop calls"):
        compress(model, recipe, (x, y), lambda m: 0.0, callbacks=[lambda *a: None])
    with pytest.raises(RecipeError, match=r"Bad.on_epoch\(entry\) cannot take the arguments .* on_epoch\(trainer, entry\)"):
        compress(model, recipe, (x, y), lambda m: 0.0, callbacks=[Bad()])
    compress(model, recipe, (x, y), lambda m: 0.0, callbacks=[Good()])
    assert Good.seen == [1]


def test_a_recipes_batch_size_beside_a_dataloader_of_another_is_said():
    """A DataLoader's batch_size overrode the recipe's training.batch_size without a word."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 8}], "training": {"epochs": 1, "batch_size": 64}}
    with pytest.warns(UserWarning, match=r"training.batch_size: 64, but the DataLoader given makes batches of 32"):
        compress(nn.Sequential(nn.Linear(8, 2)), recipe, loader, lambda m: 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recipe leaves the batch size to the loader: nothing to say
        compress(nn.Sequential(nn.Linear(8, 2)), {"techniques": [{"type": "quant_lsq", "bits": 8}],
                                                  "training": {"epochs": 1}}, loader, lambda m: 0.0)


def test_a_checkpoint_that_does_not_fit_names_the_key():
    """The reason was torch's first line alone, "Error(s) in loading state_dict for Sequential:", naming no key, and
    a checkpoint without its model entry read as ('model')."""
    from jointcompress.training.checkpoints import _why_not_fit

    try:
        torch.nn.Sequential(torch.nn.Linear(4, 2)).load_state_dict({"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(2)})
    except RuntimeError as err:
        said = _why_not_fit(err)
    assert "0.weight" in said and "size mismatch" in said
    assert _why_not_fit(KeyError("model")) == "it has no 'model' entry"

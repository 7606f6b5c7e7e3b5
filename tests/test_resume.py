"""Checkpoints and resume: a run killed with SIGKILL mid-epoch and resumed ends exactly where
the uninterrupted run ends; checkpoints hold the whole state, load without unpickling and
are never silently overwritten."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from jointcompress import DataError, RecipeError, TrainingError, compress
from jointcompress.checkpoint import CheckpointStore, read_checkpoint
from jointcompress.data import evaluator

RECIPE = {
    "mode": "joint",
    "techniques": [
        {"type": "prune_unstructured", "sparsity": 0.8, "scope": "global", "end": 0.5},
        {"type": "quant_lsq", "bits": 4, "start": 0.3},
        {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7, "cache_teacher": True},
    ],
    "training": {"epochs": 3, "batch_size": 64, "lr": 2e-3},
    "coordination": {"strategy": "scale", "every": 4},
}

SCRIPT = textwrap.dedent(
    """
    import copy, json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from jointcompress import compress
    from jointcompress.data import load_digits, evaluator
    from jointcompress.pipeline import train_teacher

    run_dir, mode, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    recipe = json.loads(os.environ["JC_RECIPE"])
    split = load_digits()
    teacher = train_teacher("lenet300", split, epochs=1, lr=2e-3)

    class Kill:
        def on_step(self, trainer, step, out):
            if mode == "kill" and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    model = copy.deepcopy(teacher)
    res = compress(model, recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test),
                   teacher=teacher, callbacks=[Kill()], run_dir=None if mode == "full" else run_dir,
                   resume=mode == "resume", checkpoint_every=5)
    masks = {f"m{i}.{k}": v.contiguous() for i, t in enumerate(res.techniques) for k, v in t.state_dict().get("masks", {}).items()}
    save_file({**masks, **{"w." + k: v.contiguous() for k, v in model.state_dict().items()}}, out + ".safetensors")
    json.dump({"metrics": res.metrics, "epochs": [e["metrics"] for e in res.history.epochs],
               "losses": [e["losses"] for e in res.history.epochs], "events": res.history.events,
               "best_epoch": res.history.best_epoch}, open(out + ".json", "w"))
    """
)


def _run(tmp_path: Path, mode: str, kill_at: int = -1) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "JC_RECIPE": json.dumps(RECIPE), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run"), mode, str(tmp_path / mode), str(kill_at)],
        env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    full = _run(tmp_path, "full")
    assert full.returncode == 0, full.stderr
    # 22 steps per epoch: step 37 is mid-epoch 2, two steps after the checkpoint of step 35
    killed = _run(tmp_path, "kill", kill_at=37)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    names = [p.name for p in CheckpointStore(tmp_path / "run").paths()]
    assert names[-1] == "ckpt-000000035.pt", names
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    resumed = _run(tmp_path, "resume")
    assert resumed.returncode == 0, resumed.stderr

    a, b = load_file(str(tmp_path / "full.safetensors")), load_file(str(tmp_path / "resume.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith(".hard") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # masks, scores and every weight bit-identical
    ja, jb = json.loads((tmp_path / "full.json").read_text()), json.loads((tmp_path / "resume.json").read_text())
    assert jb["events"][0]["event"] == "resumed" and jb["events"][0]["step"] == 35
    for key in ("metrics", "epochs", "losses", "best_epoch"):
        assert ja[key] == jb[key], key  # exactly: same batches, same RNG, same arithmetic


def _tiny(digits, teacher=None, epochs=2, micro_batches=1, precision="fp32", **kw):
    import copy

    model = copy.deepcopy(teacher) if teacher is not None else torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5}],
              "training": {"epochs": epochs, "batch_size": 128, "micro_batches": micro_batches, "precision": precision}}
    return compress(model, recipe, (digits.x_train, digits.y_train), evaluator(digits.x_test, digits.y_test), **kw), model


def test_checkpoint_holds_the_whole_run_state(digits, tmp_path):
    _tiny(digits, run_dir=tmp_path, checkpoint_every=3)
    paths = CheckpointStore(tmp_path).paths()
    assert len(paths) == 2  # the newest two are kept
    ck = read_checkpoint(paths[-1])
    assert {"model", "techniques", "optimizer", "torch_rng", "loader_gen", "epoch_start_gen", "best", "meta"} <= set(ck)
    assert "1.parametrizations.weight.original" in ck["model"]
    assert "hard" in "".join(ck["techniques"][0]["masks"])
    assert ck["optimizer"]["state"] and ck["optimizer"]["param_groups"][0]["name"] == "weights"
    meta = ck["meta"]
    assert meta["position"]["step"] == 22 and meta["position"]["epoch"] == 2  # 11 steps per epoch, the final one
    assert {"history", "recipe", "lr_scale", "python_rng", "numpy_rng", "technique_scalars", "coordinator"} <= set(meta)
    assert len(meta["history"]["epochs"]) == 2 and meta["recipe"]["training"]["epochs"] == 2


def test_a_new_run_never_overwrites_checkpoints(digits, tmp_path):
    _tiny(digits, epochs=1, run_dir=tmp_path)
    before = {p.name: p.read_bytes() for p in CheckpointStore(tmp_path).paths()}
    with pytest.raises(RecipeError, match="resume"):
        _tiny(digits, epochs=1, run_dir=tmp_path)
    assert {p.name: p.read_bytes() for p in CheckpointStore(tmp_path).paths()} == before


def test_resume_with_another_recipe_is_refused(digits, tmp_path):
    _tiny(digits, epochs=1, run_dir=tmp_path)
    with pytest.raises(RecipeError, match="different recipe"):
        _tiny(digits, epochs=2, run_dir=tmp_path, resume=True)


def test_resume_without_checkpoint_starts_fresh_and_finished_run_resumes_to_same_result(digits, tmp_path):
    res1, m1 = _tiny(digits, epochs=1, run_dir=tmp_path, resume=True)
    assert not res1.history.events
    res2, m2 = _tiny(digits, epochs=1, run_dir=tmp_path, resume=True)
    assert res2.history.events[-1]["event"] == "resumed"
    assert res1.metrics == res2.metrics
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(digits, tmp_path):
    _tiny(digits, run_dir=tmp_path, checkpoint_every=4)
    older, newest = CheckpointStore(tmp_path).paths()
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated (e.g. by a full disk outside our atomic write)
    with pytest.warns(UserWarning, match="skipped unusable"):
        res, _ = _tiny(digits, run_dir=tmp_path, checkpoint_every=4, resume=True)
    assert res.history.events[-1] == {"event": "resumed", "step": int(older.stem.split("-")[1]), "checkpoint": older.name}


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickle_payload_is_refused_and_never_runs(digits, tmp_path):
    marker = tmp_path / "pwned"
    ckdir = tmp_path / "run" / "checkpoints"
    ckdir.mkdir(parents=True)
    torch.save({"format": "jointcompress-checkpoint", "format_version": 1, "meta": "{}", "model": _Evil(marker)}, ckdir / "ckpt-000000005.pt")
    with pytest.raises(TrainingError, match="no usable checkpoint.*never pickled objects"):
        _tiny(digits, run_dir=tmp_path / "run", resume=True)
    with pytest.raises(TrainingError, match="not a loadable checkpoint"):
        read_checkpoint(ckdir / "ckpt-000000005.pt")
    assert not marker.exists()


class _StopAt:
    """A callback that ends the run at `step` (as a killed process would, after its last checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, trainer, step, out):
        if step == self.step:
            raise KeyboardInterrupt

    def __getattr__(self, name):
        return lambda *a, **k: None


def _argmax_task(n: int, hidden: int):
    """Inputs, which of their first 4 features is largest, and a maker of the same fresh MLP."""
    torch.manual_seed(0)
    x = torch.randn(n, 32)

    def model():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(32, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))

    return x, x[:, :4].argmax(1), model


def _resumes_to(whole, model, recipe, data, run_dir) -> None:
    """The run stopped in `run_dir` resumes (and says so) to `whole`'s weights, bit for bit."""
    resumed = compress(model(), recipe, data, lambda m: 0.0, run_dir=run_dir, resume=True)
    assert any(e["event"] == "resumed" for e in resumed.history.events)
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return resumed


@pytest.mark.parametrize("strategy", ["none", "pcgrad"])
def test_a_joint_size_budget_run_resumes_bit_for_bit(tmp_path, strategy):
    """The joint form (dead zones under size_budget, recalibrated on every step of this short run): the
    fused optimizer moves weights without moving their version counters, so a kept-weight count read
    before the next forward was the last forward's; the resumed run, which has none, drifted from the
    uninterrupted one (0.02 in the logits with PCGrad)."""
    x, y, model = _argmax_task(512, 128)
    recipe = {"mode": "joint", "target": {"ratio": 20}, "training": {"epochs": 4, "batch_size": 32},
              "coordination": {"strategy": strategy, "every": 10},
              "techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True, "learn_bits": False},
                             {"type": "size_budget"}]}
    with pytest.raises(KeyboardInterrupt):
        compress(model(), recipe, (x, y), lambda m: 0.0, run_dir=tmp_path, checkpoint_every=10, callbacks=[_StopAt(37)])
    _resumes_to(compress(model(), recipe, (x, y), lambda m: 0.0), model, recipe, (x, y), tmp_path)


def test_a_run_started_before_the_joint_form_resumes_as_overlap_and_joint_says_how(tmp_path):
    """Before the joint form, mode: joint under a size target trained masks and LSQ on the allocator's
    budgets; its checkpoints name mode: joint. Today that is mode: overlap: the run resumes with it to
    the uninterrupted run's weights, and resuming with mode: joint is refused with that way out."""
    x, y, model = _argmax_task(256, 64)
    recipe = {"mode": "overlap", "target": {"ratio": 12}, "training": {"epochs": 3, "batch_size": 32},
              "techniques": [{"type": "prune_unstructured", "end": 0.5}, {"type": "quant_lsq", "bits": 4, "start": 0.3}]}
    with pytest.raises(KeyboardInterrupt):
        compress(model(), recipe, (x, y), lambda m: 0.0, run_dir=tmp_path, checkpoint_every=8, callbacks=[_StopAt(13)])
    for path in CheckpointStore(tmp_path).paths():  # as the code before the joint form wrote them
        ck = torch.load(path, weights_only=True)
        meta = json.loads(ck["meta"])
        meta["recipe"]["mode"] = "joint"
        ck["meta"] = json.dumps(meta)
        torch.save(ck, path)
        path.with_name(path.name + ".sha256").unlink()  # that code wrote no checksum sidecar
    with pytest.raises(RecipeError, match="resume it with --mode overlap"):
        compress(model(), {**recipe, "mode": "joint"}, (x, y), lambda m: 0.0, run_dir=tmp_path, resume=True)
    _resumes_to(compress(model(), recipe, (x, y), lambda m: 0.0), model, recipe, (x, y), tmp_path)


def test_the_joint_form_resumes_bit_for_bit_from_inside_its_catch_up(tmp_path):
    """What mode: joint trains from a prune + quantize recipe (the Fisher estimate in the quantizers'
    buffers orders the landing's cuts): stopped between the window's end and the freeze, where the
    catch-up cuts at every calibration of this short run, it resumes to the uninterrupted run's weights."""
    x, y, model = _argmax_task(512, 128)
    recipe = {"mode": "joint", "target": {"ratio": 20}, "training": {"epochs": 2, "batch_size": 32},
              "techniques": [{"type": "prune_unstructured", "sparsity": 0.9}, {"type": "quant_lsq", "bits": 4}]}
    with pytest.warns(UserWarning, match="after its decision window"):
        whole = compress(model(), recipe, (x, y), lambda m: 0.0)
    budget = next(t for t in whole.techniques if t.kind == "size_budget")
    cuts = [e["step"] for e in budget.events if e["event"] == "size_catch_up"]
    stop = cuts[len(cuts) // 2]
    assert cuts[0] < stop < cuts[-1], cuts  # stopped inside the catch-up
    freeze = next(e["step"] for e in budget.events if e["event"] == "size_freeze")

    def size_events(history):
        return [e for e in history.events if e["event"].startswith("size_")]

    assert size_events(whole.history) == budget.events and len(budget.events) > 3
    after_freeze = (freeze // 5 + 1) * 5  # a checkpoint after the freeze (every 5 steps), stopped right after it
    assert after_freeze < 32, freeze  # 2 epochs of 16 steps
    for at, run_dir in ((stop, tmp_path / "catch_up"), (after_freeze, tmp_path / "frozen")):
        with pytest.raises(KeyboardInterrupt):
            compress(model(), recipe, (x, y), lambda m: 0.0, run_dir=run_dir, checkpoint_every=5, callbacks=[_StopAt(at)])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed = _resumes_to(whole, model, recipe, (x, y), run_dir)
        late = [w for w in caught if "after its decision window" in str(w.message)]
        assert not late, (at, late)  # said once, before the checkpoint: a resumed catch-up does not say it again
        # the size budget's events are the history's, those before the checkpoint too (a resume lost them,
        # compress()'s history had none, and the freeze a resume replays must not add its own again)
        assert size_events(resumed.history) == budget.events, at


def _stopped_latency_run(run_dir, monkeypatch):
    """A latency-target run stopped at step 7 in `run_dir`, its target resolved to sparsity 0.25; from then on a
    resolution gives 0.75 (what timing again would give: other load, other widths). Returns x, y, the model
    maker and the recipe."""
    import jointcompress.targets as targets
    from jointcompress.recipe import parse_recipe

    def resolving_to(sparsity):
        def resolve(model, asked, example, sensitivity=None):
            data = asked.model_dump()
            data["target"] = None
            data["techniques"][0]["sparsity"] = sparsity
            return parse_recipe(data)
        return resolve

    x, y, model = _argmax_task(512, 64)
    recipe = {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.5}],
              "target": {"latency_ms": 1.0, "batch": 1}, "training": {"epochs": 2, "batch_size": 64}}
    monkeypatch.setattr(targets, "resolve_target", resolving_to(0.25))
    with pytest.raises(KeyboardInterrupt):
        compress(model(), recipe, (x, y), lambda m: 0.0, run_dir=run_dir, checkpoint_every=3, callbacks=[_StopAt(7)])
    monkeypatch.setattr(targets, "resolve_target", resolving_to(0.75))
    return x, y, model, recipe


def test_a_resumed_run_keeps_the_target_its_checkpoint_resolved(tmp_path, monkeypatch):
    """A latency target is allocated from timings: allocated again on resume (other load, other widths:
    LeNet-5's conv2 got 8, 40 and 50 channels in three allocations), the checkpoint no longer fit the
    recipe and the run could not be resumed. The resolution the run started with is reused."""
    x, y, model, recipe = _stopped_latency_run(tmp_path, monkeypatch)
    resumed = compress(model(), recipe, (x, y), lambda m: 0.0, run_dir=tmp_path, resume=True)
    assert any(e["event"] == "resumed" for e in resumed.history.events)
    assert resumed.recipe.technique("prune_structured").sparsity == 0.25
    changed = {**recipe, "target": {"latency_ms": 2.0, "batch": 1}}  # another target: resolved again, then refused
    with pytest.raises(RecipeError, match="different recipe"):
        compress(model(), changed, (x, y), lambda m: 0.0, run_dir=tmp_path, resume=True)


@pytest.mark.parametrize("setting", [{"micro_batches": 2}, {"recalibrate_norms": 4}])
def test_a_run_resumed_with_a_setting_it_may_change_keeps_its_resolved_target(tmp_path, monkeypatch, setting):
    """A resumed run may set training.micro_batches, precision and recalibrate_norms anew (recipe.MEMORY_FIELDS);
    the resolution was reused only for the exact recipe asked, so such a resume timed its latency target
    again, got other widths and was refused as another recipe. The resumed run keeps the new setting."""
    x, y, model, recipe = _stopped_latency_run(tmp_path, monkeypatch)
    again = {**recipe, "training": {**recipe["training"], **setting}}
    resumed = compress(model(), again, (x, y), lambda m: 0.0, run_dir=tmp_path, resume=True)
    assert any(e["event"] == "resumed" for e in resumed.history.events)
    assert resumed.recipe.technique("prune_structured").sparsity == 0.25
    (field, value), = setting.items()
    assert getattr(resumed.recipe.training, field) == value
    resumed_event = next(e for e in resumed.history.events if e["event"] == "resumed")
    assert resumed_event["changed"][f"training.{field}"][1] == value  # the history says what the resume set anew


def test_resuming_in_another_precision_says_so_and_records_it(digits, tmp_path):
    """A run begun in fp32 and resumed in bf16 was accepted without a word, its artifact's recipe saying bf16
    for the whole run."""
    _tiny(digits, run_dir=tmp_path, checkpoint_every=3)
    with pytest.warns(UserWarning, match=r"the run trained in fp32 up to step \d+ and continues in bf16"):
        res, _ = _tiny(digits, run_dir=tmp_path, checkpoint_every=3, resume=True, precision="bf16")
    event = next(e for e in res.history.events if e["event"] == "resumed")
    assert event["changed"] == {"training.precision": ["fp32", "bf16"]}


def test_resuming_with_another_number_of_processes_says_what_it_changes(digits, tmp_path):
    """A torchrun run of 2 processes resumed in one was accepted silently: the steps match (the batch is
    global) but the epoch's remaining batches come from another sharding."""
    import json as _json

    _tiny(digits, run_dir=tmp_path, checkpoint_every=3)
    newest = CheckpointStore(tmp_path).paths()[-1]
    ck = read_checkpoint(newest)
    ck["meta"] = _json.dumps({**ck["meta"], "world_size": 2})
    torch.save(ck, newest)
    newest.with_name(newest.name + ".sha256").unlink()  # edited: not the bytes its checksum was taken of
    with pytest.warns(UserWarning, match=r"written by a run of 2 process\(es\), this one has 1.*Resume with 2"):
        res, _ = _tiny(digits, run_dir=tmp_path, checkpoint_every=3, resume=True)
    assert res.history.events[-1]["event"] == "resumed"


@pytest.mark.parametrize("field", ["keep", "micro_batches", "precision", "greater_is_better", "recalibrate_norms"])
def test_a_checkpoint_from_before_a_training_field_resumes(digits, tmp_path, field):
    """training.keep and training.micro_batches were added later: a checkpoint whose recipe lacks one
    trained with its default ('best', 1) and must not read as made with a different recipe."""
    import json as _json

    _tiny(digits, run_dir=tmp_path, checkpoint_every=3)
    newest = CheckpointStore(tmp_path).paths()[-1]
    ck = read_checkpoint(newest)
    meta = dict(ck["meta"]) if isinstance(ck["meta"], str) else dict(ck["meta"])
    del meta["recipe"]["training"][field]
    ck["meta"] = _json.dumps(meta)
    torch.save(ck, newest)
    newest.with_name(newest.name + ".sha256").unlink()
    res, _ = _tiny(digits, run_dir=tmp_path, checkpoint_every=3, resume=True)
    assert res.history.events[-1]["event"] == "resumed"


def test_a_checkpoint_from_before_a_recipe_field_resumes(digits, tmp_path):
    """`inputs` (top level) and target.refit_on_rounding came later: a checkpoint whose recipe lacks one read its
    data standardised and re-fitted on rounding, and must not read as made with a different recipe (a top-level
    field was not filled in at all)."""
    import json as _json

    from jointcompress.recipe import with_added_fields

    _tiny(digits, run_dir=tmp_path, checkpoint_every=3)
    newest = CheckpointStore(tmp_path).paths()[-1]
    ck = read_checkpoint(newest)
    meta = dict(ck["meta"])
    for key in ("recipe", "given_recipe"):
        if meta.get(key):
            del meta[key]["inputs"]
    ck["meta"] = _json.dumps(meta)
    torch.save(ck, newest)
    newest.with_name(newest.name + ".sha256").unlink()
    res, _ = _tiny(digits, run_dir=tmp_path, checkpoint_every=3, resume=True)
    assert res.history.events[-1]["event"] == "resumed"
    old = with_added_fields({"target": {"ratio": 20.0}, "training": {}})
    assert old["inputs"] == "standardised" and old["target"]["refit_on_rounding"] is True


class Crash(Exception):
    """The process killed mid-run."""


class CrashAt:
    def __init__(self, step: int):
        self.step = step

    def on_step(self, trainer, step, out):
        if step == self.step:
            raise Crash


def test_a_run_resumes_with_other_micro_batches(digits, tmp_path):
    """micro_batches sets memory, not the run: a run that ran out of memory resumes with more of them (the
    recipe check refused it as a different recipe) and ends where the uninterrupted run ends."""
    _, whole = _tiny(digits, epochs=2)
    with pytest.raises(Crash):
        _tiny(digits, epochs=2, run_dir=tmp_path, checkpoint_every=5, callbacks=[CrashAt(13)])
    res, resumed = _tiny(digits, epochs=2, run_dir=tmp_path, checkpoint_every=5, resume=True, micro_batches=4)
    assert any(e["event"] == "resumed" for e in res.history.events)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(RecipeError, match="different recipe"):  # another recipe is still refused
        _tiny(digits, epochs=3, run_dir=tmp_path, resume=True, micro_batches=4)


def test_a_run_checkpointed_in_float32_resumes_in_bf16(digits, tmp_path):
    """training.precision sets speed and memory, not the run: a float32 run resumes in bf16 autocast."""

    class ForwardDtypes:
        def __init__(self):
            self.seen = set()

        def on_step(self, trainer, step, out):
            if not self.seen:
                trainer.model[1].register_forward_hook(self.note)
                self.seen.add("hooked")

        def note(self, module, inputs, output):
            if module.training:  # evaluation runs in float32
                self.seen.add(output.dtype)

    with pytest.raises(Crash):
        _tiny(digits, epochs=2, run_dir=tmp_path, checkpoint_every=5, callbacks=[CrashAt(13)])
    spy = ForwardDtypes()
    res, _ = _tiny(digits, epochs=2, run_dir=tmp_path, checkpoint_every=5, resume=True, precision="bf16", callbacks=[spy])
    assert any(e["event"] == "resumed" for e in res.history.events)
    assert spy.seen == {"hooked", torch.bfloat16}


def test_a_refused_resume_names_the_field_the_user_changed_with_their_own_index(digits, tmp_path):
    """The check compared the resolved recipes: a changed target.ratio came 'and 2 more' behind the sparsities the
    allocator derived from it, and mode: joint named quant_lsq techniques[0] (the joint form drops
    prune_unstructured) where the user's file has it at techniques[1]."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    recipe = {"mode": "joint", "target": {"ratio": 20},
              "techniques": [{"type": "prune_unstructured"}, {"type": "quant_lsq", "bits": 4}],
              "training": {"epochs": 1, "batch_size": 128}}
    with pytest.raises(Crash):
        compress(copy.deepcopy(model), recipe, (digits.x_train, digits.y_train), evaluator(digits.x_test, digits.y_test),
                 run_dir=tmp_path, checkpoint_every=3, callbacks=[CrashAt(5)])
    changed = {**recipe, "techniques": [{"type": "prune_unstructured"}, {"type": "quant_lsq", "bits": 3}]}
    with pytest.raises(RecipeError, match=r"different recipe than the one given now \(techniques\[1\]\.bits: 4 in the "
                                          r"checkpoint, 3 now\); resume"):
        compress(copy.deepcopy(model), changed, (digits.x_train, digits.y_train), evaluator(digits.x_test, digits.y_test),
                 run_dir=tmp_path, resume=True)


def test_a_checkpoint_without_its_checksum_is_still_checked(digits, tmp_path):
    """A run killed between a checkpoint and its .sha256 leaves it unchecked; damaged in place as well, it
    resumed without a word into another artifact. The CRC of every archive entry is read instead."""
    import zipfile

    _tiny(digits, run_dir=tmp_path, checkpoint_every=3)
    newest = CheckpointStore(tmp_path).paths()[-1]
    newest.with_name(newest.name + ".sha256").unlink()
    read_checkpoint(newest)  # intact: loads
    data = bytearray(newest.read_bytes())
    tensors = [i for i in zipfile.ZipFile(newest).infolist() if "/data/" in i.filename]
    entry = max(tensors, key=lambda i: i.file_size)  # the largest tensor's bytes
    at = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra) + entry.file_size // 2
    data[at] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match=r"no checksum file, and its archive entry .* fails its CRC"):
        read_checkpoint(newest)
    newest.write_bytes(bytes(data[: len(data) // 2]))  # cut short: it read "its archive entry BadZipFile: ... fails its CRC"
    with pytest.raises(TrainingError, match=r"no checksum file, and it is not a whole archive \(BadZipFile"):
        read_checkpoint(newest)


class _ShuffledBatches(torch.utils.data.Sampler):
    """A user's batch sampler that shuffles with its own generator."""

    def __init__(self, n: int, size: int, generator: torch.Generator):
        self.n, self.size, self.generator = n, size, generator

    def __len__(self):
        return (self.n + self.size - 1) // self.size

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        return iter([order[i:i + self.size] for i in range(0, self.n, self.size)])


def _sampler_loader(digits, holder: str = "sampler"):
    """A user's loader whose shuffle draws from its sampler's (or batch sampler's) own generator, not the loader's."""
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    data, generator = TensorDataset(digits.x_train, digits.y_train), torch.Generator().manual_seed(7)
    if holder == "batch_sampler":
        return DataLoader(data, batch_sampler=_ShuffledBatches(len(data), 128, generator))
    return DataLoader(data, batch_size=128, sampler=RandomSampler(data, generator=generator))


@pytest.mark.parametrize("holder", ["sampler", "batch_sampler"])
def test_a_run_whose_sampler_has_its_own_generator_resumes_mid_epoch_bit_for_bit(digits, tmp_path, holder):
    """The epoch a resumed run replays is the one the interrupted run was in: the sampler's generator had moved
    on by then (one draw per epoch), and a fresh one would replay the first epoch's order."""
    class StopAt:
        def on_step(self, trainer, step, out):
            if step == 27:  # 11 steps per epoch: mid-epoch 3, after the checkpoint of step 24
                raise KeyboardInterrupt

    def run(**kw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5}],
                  "training": {"epochs": 3, "batch_size": 128}}
        return compress(model, recipe, _sampler_loader(digits, holder), evaluator(digits.x_test, digits.y_test), **kw)

    whole = run()
    with pytest.raises(KeyboardInterrupt):
        run(run_dir=tmp_path, checkpoint_every=8, callbacks=[StopAt()])
    resumed = run(run_dir=tmp_path, resume=True)
    assert resumed.history.events[0]["event"] == "resumed" and resumed.history.events[0]["step"] == 24
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generator_states_read_a_checkpoint_from_before_the_samplers_and_name_a_changed_loader(digits):
    """Older checkpoints hold the loader's one state (a tensor) or None; a loader with other generators
    than the run had cannot replay its order, and the resume says so."""
    from jointcompress.training.epochs import generator_states, set_generator_states

    loader = _sampler_loader(digits)
    generator = loader.sampler.generator
    start = generator.get_state()
    torch.rand(3, generator=generator)
    set_generator_states(loader, start)  # the old format: one tensor
    assert torch.equal(generator.get_state(), start)
    set_generator_states(loader, None)
    assert torch.equal(generator.get_state(), start)
    with pytest.warns(UserWarning, match="2 shuffle generator.*loader now has 1"):
        set_generator_states(loader, [start, start])
    assert len(generator_states(loader)) == 1


def test_a_process_count_that_changes_the_steps_is_named_not_the_data(digits, tmp_path):
    """Resumed with 3 processes where 2 ran (a batch of 32 splits into 10 per process), the step counts differ,
    and the refusal blamed the training data or batch size."""
    import json as _json

    _tiny(digits, run_dir=tmp_path, checkpoint_every=3)
    newest = CheckpointStore(tmp_path).paths()[-1]
    ck = read_checkpoint(newest)
    meta = ck["meta"] if isinstance(ck["meta"], dict) else _json.loads(ck["meta"])
    ck["meta"] = _json.dumps({**meta, "world_size": 3, "total_steps": meta["total_steps"] + 1})
    torch.save(ck, newest)
    newest.with_name(newest.name + ".sha256").unlink()
    with pytest.raises(TrainingError, match=r"this run has 1 process\(es\) and the checkpoint's 3.*Resume with 3"):
        _tiny(digits, run_dir=tmp_path, checkpoint_every=3, resume=True)


def test_a_resume_on_other_rows_in_a_tensor_loader_is_refused(digits, tmp_path):
    """The HF command line hands compress() a DataLoader over its tokenized rows: only the step count was checked,
    so other rows of the same count resumed silently, with cached teacher outputs of the old rows."""
    from torch.utils.data import DataLoader, TensorDataset

    def loader(x, y):
        return DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))

    def run(x, **kw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        return compress(model, {"techniques": [{"type": "quant_lsq", "bits": 4}], "training": {"epochs": 2}},
                        loader(x, digits.y_train), evaluator(digits.x_test, digits.y_test), **kw)

    run(digits.x_train, run_dir=tmp_path, checkpoint_every=3)
    with pytest.raises(DataError, match="trained on other data"):
        run(digits.x_train.flip(0), run_dir=tmp_path, resume=True)


def test_tensorboard_plots_each_step_once_after_a_resume(tmp_path):
    """Killed at step 12 after its checkpoint at step 8 (the first epoch's evaluation), the resumed run logged steps
    8 to 11 again: TensorBoard plotted both values of each (two event files). The resumed writer purges the steps
    it replays, and logs again the epoch the purge took."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jointcompress.tensorboard import TensorBoardLogger

    x, y, model = _argmax_task(64, 16)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5}],
              "training": {"epochs": 2, "batch_size": 8}}
    tb = tmp_path / "tb"
    first = TensorBoardLogger(tb)
    with pytest.raises(KeyboardInterrupt):  # its newest checkpoint: the evaluation's at step 8
        compress(model(), recipe, (x, y), lambda m: 0.0, callbacks=[first, _StopAt(12)], run_dir=tmp_path / "run",
                 checkpoint_every=100)
    first.close()
    second = TensorBoardLogger(tb)
    compress(model(), recipe, (x, y), lambda m: 0.0, callbacks=[second], run_dir=tmp_path / "run", resume=True)
    second.close()
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(tb)).Reload()
    steps = [e.step for e in events.Scalars("loss/task")]
    assert steps == sorted(set(steps)) == list(range(16)), steps
    # the epoch logged at step 8, whose evaluation checkpoint the run resumed from, is not purged with the replay
    assert [e.step for e in events.Scalars("epoch/loss/task")] == [8, 16]


class _InfOnMarkedRows(torch.nn.Module):
    """A model whose training forward is inf on a batch holding a marked row (x[:, 0] > 50): a non-finite step."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))

    def forward(self, x):
        out = self.net(x)
        return out * float("inf") if self.training and bool((x[:, 0] > 50).any()) else out


def test_a_non_finite_step_after_a_resume_rolls_back_where_the_uninterrupted_run_does(tmp_path):
    """The uninterrupted run rolled the step-13 failure back to its epoch-end snapshot (step 10), the resumed one to
    the step-12 checkpoint it resumed from: two runs 7e-4 apart. A snapshot is taken at every checkpoint now."""

    def setup():
        torch.manual_seed(0)
        x = torch.randn(320, 20)
        y = (x[:, :5].sum(1) > 0).long()
        x[3 * 32 + 5, 0] = 1e3  # batch 3 of every epoch: steps 3, 13 and 23 are not finite
        torch.manual_seed(2)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=False)
        return _InfOnMarkedRows(), loader

    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.6}],
              "training": {"epochs": 3, "batch_size": 32, "recalibrate_norms": 0}}

    class Stop(Exception):
        pass

    class StopAt12:
        def on_step(self, trainer, step, out):
            if step == 12:
                raise Stop()

    runs = {}
    for name, stops in (("whole", False), ("resumed", True)):
        model, loader = setup()
        kwargs = {"run_dir": tmp_path / name, "checkpoint_every": 4, "max_nonfinite": 5}
        if stops:
            with pytest.raises(Stop):
                compress(model, recipe, loader, lambda m: 0.0, callbacks=[StopAt12()], **kwargs)
            model, loader = setup()
            kwargs["resume"] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = compress(model, recipe, loader, lambda m: 0.0, **kwargs)
        runs[name] = (model.state_dict(), [e["rolled_back_to"] for e in result.history.events if e["event"] == "nonfinite"])
    assert runs["whole"][1] == runs["resumed"][1] == [0, 12, 20]
    assert all(torch.equal(v, runs["resumed"][0][k]) for k, v in runs["whole"][0].items())


@pytest.mark.parametrize("position", [None, {"step": "abc"}, {"step": 1_000_000}, {"step": -3}])
def test_a_checkpoint_whose_position_is_damaged_is_refused_by_name(digits, tmp_path, position):
    """Edited behind a rewritten checksum: no position or a step of "abc" ended in a KeyError / TypeError traceback,
    and step 1,000,000 of the run's few resumed 'past the end' and saved a model the run never trained to it."""
    import json as _json

    _tiny(digits, run_dir=tmp_path, checkpoint_every=3)
    newest = CheckpointStore(tmp_path).paths()[-1]
    ck = read_checkpoint(newest)
    meta = dict(ck["meta"])
    if position is None:
        del meta["position"]
    else:
        meta["position"] = {**meta["position"], **position}
    ck["meta"] = _json.dumps(meta)
    torch.save(ck, newest)
    newest.with_name(newest.name + ".sha256").unlink()
    with pytest.raises(TrainingError, match="its record of where the run stood .* is damaged or not of this run"):
        _tiny(digits, run_dir=tmp_path, checkpoint_every=3, resume=True)

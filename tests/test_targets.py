"""A size target becomes per-layer budgets whose saved artifact weighs what was asked."""
import copy
import os
import warnings

import pytest
import torch

from jointcompress.api import compress
from jointcompress.artifact.store import save
from jointcompress.data import evaluator, load_digits
from jointcompress.finalize import finalize
from jointcompress.pipeline import train_teacher
from jointcompress.recipe import parse_recipe
from jointcompress.targets import TargetError, resolve_target


@pytest.fixture(scope="module")
def digits_teacher():
    split = load_digits()
    return split, train_teacher("lenet300", split, 3)


def _recipe(target, epochs=2):
    """The allocator's recipe (mode: overlap; mode: joint trains its joint form, tests/test_joint_form.py)."""
    return parse_recipe({"model": "lenet300", "mode": "overlap", "target": target, "techniques": [
        {"type": "prune_unstructured", "sparsity": 0.9, "end": 0.6},
        {"type": "quant_lsq", "bits": 4, "start": 0.3},
        {"type": "distill_kd", "cache_teacher": True}],
        "training": {"epochs": epochs, "batch_size": 64, "lr": 0.002}})


# ~85% sparse at 4 bits; ~50% sparse at 5 bits; ~96% sparse at 3-4 bits, where the estimate made
# before training is 3.4% off and only steering during training lands it
@pytest.mark.parametrize("size_kb", [14.0, 19.8, 6.6])
def test_size_kb_target_is_met_on_disk(digits_teacher, tmp_path, size_kb):
    split, teacher = digits_teacher
    resolved = resolve_target(teacher, _recipe({"size_kb": size_kb}), split.x_train[:2])
    assert resolved.target.allocated and resolved.target.steer  # compress() steers, does not re-allocate
    prune, quant = resolved.technique("prune_unstructured"), resolved.technique("quant_lsq")
    assert set(prune.layer_sparsity) == {"fc1", "fc2", "fc3"} and set(quant.layer_bits) == {"fc1", "fc2", "fc3"}
    model = copy.deepcopy(teacher)
    result = compress(model, resolved, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test), teacher=teacher)
    spec = finalize(model, result.example_inputs)
    manifest = save(model, spec, tmp_path / "a", example_inputs=result.example_inputs)
    on_disk = os.path.getsize(tmp_path / "a" / "weights.jcw")
    assert on_disk == manifest["weights_file_bytes"]
    assert abs(on_disk / (size_kb * 1024) - 1) <= 0.02, (on_disk, manifest["bytes"])
    steered = [e["event"] for e in result.history.events if e["event"].startswith("size_")]
    assert steered == ["size_steering", "size_trim"]  # re-fitted late in the ramp, trimmed at 90% of the run
    trim = result.history.events[-1]
    assert trim["goal_bytes"] == round(size_kb * 1024) and abs(trim["predicted_bytes"] / on_disk - 1) <= 0.01
    prune = result.techniques[0]
    assert prune.retargeted == trim["layer_sparsity_after"] and prune.retarget_count == 2
    for name, m in zip(prune.layers, prune.masks.values()):  # the run ended exactly at the steered targets
        assert abs(m.sparsity() - prune.retargeted[name]) <= 1.0 / m.hard.numel() + 1e-6


def test_size_target_in_sequential_mode(digits_teacher, tmp_path):
    """Sequential runs steer too: the trim lands in the (frozen) pruning technique's masks
    during quantization-aware fine-tuning, so joint and sequential compare at the same size."""
    split, teacher = digits_teacher
    data = _recipe({"size_kb": 14.0}, epochs=3).model_dump()
    data["mode"] = "sequential"
    model = copy.deepcopy(teacher)
    result = compress(model, data, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test), teacher=teacher)
    events = [e for e in result.history.events if e["event"].startswith("size_")]
    assert [e["event"] for e in events] == ["size_steering", "size_rounding_check", "size_trim"]
    assert not events[1]["refit"]  # at 4 bits the masks fitted before LSQ are near the goal on its rounding
    spec = finalize(model, result.example_inputs)
    manifest = save(model, spec, tmp_path / "a", example_inputs=result.example_inputs)
    assert abs(manifest["weights_file_bytes"] / (14.0 * 1024) - 1) <= 0.02


def test_a_short_run_over_its_size_target_is_trimmed_before_its_last_step(tmp_path):
    """At 90% of a run under 20 steps the trim fell on the last step, which it skipped: no re-fit ran and the
    file missed its target by 9-17% (transformers' ConvNeXt and ViT, 8 and 16 steps). It now trims one step
    before the end, where the file is over the target, and gives back at most 5% of a layer's density."""
    pytest.importorskip("transformers")
    import transformers as t

    from jointcompress.artifact.size import dense_fp32_bytes
    from jointcompress.targets import trim_step

    assert (trim_step(1000, 500), trim_step(16, 5), trim_step(16, 15), trim_step(1, 0)) == (900, 14, 15, 0)

    def build():
        torch.manual_seed(0)
        return t.ConvNextForImageClassification(t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                                  patch_size=4, num_labels=10)).eval()

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 3, 32, 32, generator=g), torch.randint(0, 10, (256,), generator=g)
    teacher, model = build(), build()
    recipe = {"mode": "sequential", "target": {"ratio": 12}, "training": {"epochs": 1, "batch_size": 32},
              "techniques": [{"type": "prune_unstructured"}, {"type": "quant_lsq", "bits": 4, "start": 0.3},
                             {"type": "distill_kd", "temperature": 2, "alpha": 0.5}]}
    result = compress(model, recipe, (x, y), lambda m: {"accuracy": 0.0}, teacher=teacher)
    trims = [e for e in result.history.events if e["event"] == "size_trim"]
    assert [e["step"] for e in trims] == [result.history.epochs[-1]["step"] - 2]
    assert all(1 - trims[0]["layer_sparsity_after"][n] <= 1.05 * (1 - s) + 1e-9
               for n, s in trims[0]["layer_sparsity_before"].items())
    spec = finalize(model, result.example_inputs)
    manifest = save(model, spec, tmp_path / "a", example_inputs=result.example_inputs)
    goal = dense_fp32_bytes(build()) / 12
    assert 0.98 * goal <= manifest["weights_file_bytes"] <= goal


def test_a_short_run_under_its_size_target_keeps_its_masks(digits_teacher, tmp_path):
    """The same trim, pulled that early, leaves a file already under the target alone: a re-fit this soon after
    quantization starts mis-measured what the last steps move (an 8-step run landed 7% under, 3% untrimmed)."""
    split, teacher = digits_teacher
    data = _recipe({"size_kb": 14.0}, epochs=1).model_dump()
    data["mode"], data["training"]["batch_size"] = "sequential", 90  # 15 steps
    model = copy.deepcopy(teacher)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = compress(model, data, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test), teacher=teacher)
    assert not [w for w in said if "size target missed" in str(w.message)]  # landed: nothing to say
    moved = [e for e in result.history.events if e["event"].startswith("size_") and e.get("refit", True)]
    assert not moved  # its file measured on LSQ's rounding (near the goal), nothing re-fitted
    spec = finalize(model, result.example_inputs)
    manifest = save(model, spec, tmp_path / "a", example_inputs=result.example_inputs)
    assert 0.98 * 14.0 * 1024 <= manifest["weights_file_bytes"] <= 14.0 * 1024


def test_steered_targets_survive_a_checkpoint(digits_teacher):
    """The re-fitted targets are technique state: saved, loaded, and not steered twice."""
    from jointcompress import techniques as tech
    from jointcompress.targets import SizeSteering

    split, teacher = digits_teacher
    resolved = resolve_target(teacher, _recipe({"size_kb": 14.0}), split.x_train[:2])
    model = copy.deepcopy(teacher)
    result = compress(model, resolved, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test), teacher=teacher)
    prune = result.techniques[0]
    state = prune.state_dict()
    fresh = tech.build(resolved.techniques[0])
    fresh.layers = dict(prune.layers)
    fresh.masks.update({k: copy.deepcopy(v) for k, v in prune.masks.items()})
    fresh.load_state_dict(state)
    assert fresh.retargeted == prune.retargeted and fresh.layer_target("fc1") == prune.retargeted["fc1"]
    assert fresh.retarget_count == 2
    assert prune.rounding_check == 1 and fresh.rounding_check == 1  # overlap: its steering saw LSQ's rounding

    class _Trainer:  # a resumed run whose technique already carries steered and trimmed targets
        techniques = [fresh]
    SizeSteering(14.0 * 1024).on_step(_Trainer(), 10**6, None)  # would fail without a plan if it acted
    assert fresh.retargeted == prune.retargeted and fresh.retarget_count == 2


def test_steering_can_be_turned_off(digits_teacher):
    split, teacher = digits_teacher
    data = _recipe({"size_kb": 14.0}).model_dump()
    data["target"]["steer"] = False
    model = copy.deepcopy(teacher)
    result = compress(model, data, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test), teacher=teacher)
    assert not [e for e in result.history.events if e["event"].startswith("size_")]
    assert result.techniques[0].retargeted == {}


def test_ratio_target_and_sensitive_layers_keep_more(digits_teacher):
    split, teacher = digits_teacher
    scan = {"layers": {"fc1": {"sparsity": {"0.5": 0.0, "0.99": 0.0}, "bits": {"4": 0.0}},
                       "fc2": {"sparsity": {"0.5": 0.0, "0.99": 0.0}, "bits": {"4": 0.0}},
                       "fc3": {"sparsity": {"0.5": 0.3}, "bits": {"4": 0.0, "8": 0.0}}}}
    r = resolve_target(teacher, _recipe({"ratio": 20}), split.x_train[:2], sensitivity=scan)
    sp = r.technique("prune_unstructured").layer_sparsity
    assert sp["fc3"] < sp["fc1"] and sp["fc3"] < sp["fc2"]  # the fragile classifier keeps more


def test_impossible_size_target_names_the_fix(digits_teacher):
    split, teacher = digits_teacher
    with pytest.raises(TargetError, match="size_kb"):
        resolve_target(teacher, _recipe({"size_kb": 0.5}), split.x_train[:2])


def test_latency_target_sets_channel_sparsity(digits_teacher):
    split, teacher = digits_teacher
    r = resolve_target(teacher, _recipe({"latency_ms": 1000.0, "batch": 8}), split.x_train[:2])
    assert r.target is None  # generous target: no structured pruning needed
    assert (r.technique("prune_structured") is None) or r.technique("prune_structured").sparsity == 0.0
    with pytest.raises(TargetError, match="latency_ms"):
        resolve_target(teacher, _recipe({"latency_ms": 1e-6}), split.x_train[:2])


def test_cli_reports_the_size_target_against_the_file_on_disk(tmp_path):
    from typer.testing import CliRunner

    from jointcompress.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ntarget: {size_kb: 12}\ntechniques:\n"
                      "  - {type: prune_unstructured, sparsity: 0.9, end: 0.6}\n  - {type: quant_lsq, bits: 4, start: 0.3}\n"
                      "training: {epochs: 2, batch_size: 64, lr: 0.002}\n")
    res = CliRunner().invoke(app, ["compress", str(recipe), "--teacher-epochs", "2", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    on_disk = (tmp_path / "out" / "artifact" / "weights.jcw").stat().st_size
    assert f"on disk {on_disk / 1024:.2f} KiB" in res.output and "size target: 12.00 KiB" in res.output
    assert 0.98 <= on_disk / (12 * 1024) <= 1.0  # steered to just under the target


def test_a_sparsity_the_allocator_replaces_is_named():
    """Under a size target the allocator (or the joint form's budget) sets every layer's sparsity: a run
    ignored the user's 0.9 without a word (the command line's joint note aside)."""
    import warnings

    import torch
    import torch.nn as nn

    x, y = torch.randn(64, 12), torch.randint(0, 2, (64,))
    for given, said, mode in (({"sparsity": 0.9}, True, "sequential"), ({}, False, "sequential"),
                              ({"sparsity": 0.9}, True, "joint")):
        recipe = {"mode": mode, "target": {"ratio": 6}, "training": {"epochs": 1, "batch_size": 32},
                  "techniques": [{"type": "prune_unstructured", "end": 0.5, **given}, {"type": "quant_lsq", "bits": 4}]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compress(nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 2)), recipe, (x, y), lambda m: 0.0)
        assert any("prune_unstructured.sparsity 0.9 is not used" in str(w.message) for w in caught) == said


def test_a_structured_sparsity_a_latency_target_replaces_is_named():
    """Under a latency target the allocator sets every channel group's width: a user's prune_structured.sparsity
    0.5 became 79.8% without a word."""
    import warnings

    from jointcompress.recipe import parse_recipe
    from jointcompress.targets import warn_unused_sparsity

    for given, target, said in (({"sparsity": 0.5}, {"latency_ms": 8, "batch": 64}, True),
                                ({"sparsity": 0.5}, {"speedup": 2}, True),
                                ({}, {"latency_ms": 8, "batch": 64}, False)):
        recipe = parse_recipe({"mode": "joint", "target": target, "training": {"epochs": 1},
                               "techniques": [{"type": "prune_structured", **given}, {"type": "distill_kd"}]})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_unused_sparsity(recipe)
        found = [str(w.message) for w in caught if "prune_structured.sparsity 0.5 is not used" in str(w.message)]
        assert bool(found) == said and all("latency target decides" in m for m in found)


def test_a_run_that_ends_over_its_size_target_says_so(digits_teacher, monkeypatch):
    """Without a size budget (sequential, overlap) a file over the target was found only by measuring the saved
    file; compress() now measures the state it ends with and warns when it is over."""
    from jointcompress import api

    split, teacher = digits_teacher
    data = _recipe({"size_kb": 14.0}, epochs=1).model_dump()
    data["mode"], data["training"]["batch_size"] = "sequential", 90
    asked = api._allocated_size_goal
    monkeypatch.setattr(api, "_allocated_size_goal", lambda model, recipe: 0.8 * asked(model, recipe))
    with pytest.warns(UserWarning, match=r"size target missed: the weights file would be [\d,]+ B, 2[0-9.]+% over"):
        compress(copy.deepcopy(teacher), data, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test),
                 teacher=teacher)
    assert asked(teacher, parse_recipe(data)) == 14.0 * 1024


def test_a_late_trim_that_cost_most_of_the_accuracy_is_said():
    """A depthwise-separable CNN in sequential mode went from 0.93 to 0.34 at the trim, which forgot the states
    kept before it, and the run ended there without a word (making joint look better in a comparison)."""
    from types import SimpleNamespace

    from jointcompress.recipe import parse_recipe
    from jointcompress.targets import SizeSteering

    steering = SizeSteering(1000.0)
    recipe = parse_recipe({"techniques": [{"type": "quant_lsq"}]})
    trainer = SimpleNamespace(recipe=recipe, history=SimpleNamespace(best_metric=0.339))
    steering.best_before_trim = 0.931
    with pytest.warns(UserWarning, match=r"late trim .* dropped the kept accuracy from 0.931 to 0.339"):
        steering.on_end(trainer)
    trainer.history.best_metric = 0.925  # a small cost: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steering.on_end(trainer)
        SizeSteering(1000.0).on_end(trainer)  # no trim
    # resumed after the trim, the callback is new: what it forgot is read from the trim's checkpointed event
    trainer.history = SimpleNamespace(best_metric=0.339, events=[{"event": "size_trim", "step": 150, "best_before": 0.931}])
    with pytest.warns(UserWarning, match=r"late trim .* dropped the kept accuracy from 0.931 to 0.339"):
        SizeSteering(1000.0).on_end(trainer)


def test_the_techniques_a_size_target_adds_are_said():
    """A sequential recipe of distillation alone under ratio 20 stored a low-bit, sparse artifact: the
    allocator added quant_lsq and prune_unstructured, and only the manifest's recipe showed it."""
    from jointcompress.recipe import parse_recipe
    from jointcompress.targets import resolve_target

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    recipe = parse_recipe({"mode": "sequential", "target": {"ratio": 20}, "techniques": [{"type": "distill_kd"}]})
    with pytest.warns(UserWarning, match=r"prune_unstructured and quant_lsq were added .* sparsity and bit-width"):
        resolved = resolve_target(model, recipe, torch.randn(2, 64))
    assert [t.type for t in resolved.techniques] == ["prune_unstructured", "distill_kd", "quant_lsq"]
    recipe = parse_recipe({"mode": "sequential", "target": {"ratio": 20},
                           "techniques": [{"type": "quant_lsq"}, {"type": "distill_kd"}]})
    with pytest.warns(UserWarning, match=r"so prune_unstructured was added .* every layer's sparsity from"):
        resolve_target(model, recipe, torch.randn(2, 64))


def test_a_2_bit_sequential_run_refits_its_masks_on_lsq_rounding_and_lands_near_its_target(digits_teacher, tmp_path):
    """At 2 bits many kept weights round to level 0 and are stored as zeros: priced as values, the masks fitted
    before LSQ started left the file far under its target. Once LSQ rounds, the
    check measures the masks on its rounding and re-fits them with the rest of the run to train."""
    split, teacher = digits_teacher
    data = _recipe({"size_kb": 4.0}, epochs=3).model_dump()
    data["mode"] = "sequential"
    data["techniques"][1]["bits"] = 2
    model = copy.deepcopy(teacher)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = compress(model, data, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test),
                          teacher=teacher)
    order = [e["event"] for e in result.history.events if e["event"].startswith("size_")]
    events = {e["event"]: e for e in result.history.events if e["event"].startswith("size_")}
    assert [e for e in order if e != "size_recheck_cut"] == ["size_steering", "size_rounding_check", "size_requant",
                                                             "size_recheck", "size_recheck", "size_trim"]
    assert events["size_rounding_check"]["refit"] and events["size_rounding_check"]["predicted_bytes"] < 0.95 * 4096
    rechecks = [e for e in result.history.events if e["event"] == "size_recheck"]
    steps = [events["size_requant"]["step"]] + [e["step"] for e in rechecks] + [events["size_trim"]["step"]]
    assert steps == sorted(steps) and len(set(steps)) == 4  # evenly between the re-fit and the trim
    cuts = [e for e in result.history.events if e["event"] == "size_recheck_cut"]
    assert len(cuts) == sum(e["refit"] for e in rechecks)  # a re-check over its goal cuts, one under it does not
    assert cuts and all(c["predicted_bytes"] <= 4096 for c in cuts)  # here the regrown weights went over, and were cut
    assert all(e["refit"] == (e["predicted_bytes"] > 4096) for e in rechecks)
    assert set(result.recipe.technique("quant_lsq").layer_bits.values()) == {2}
    spec = finalize(model, result.example_inputs)
    manifest = save(model, spec, tmp_path / "a", example_inputs=result.example_inputs)
    assert 0.98 * 4096 <= manifest["weights_file_bytes"] <= 4096  # within 2%, as steering lands 4-bit files
    assert not [w for w in said if "bytes the run did not spend" in str(w.message)]
    prune = result.techniques[0]
    fresh = copy.deepcopy(prune)
    fresh.rounding_check = 0
    fresh.load_state_dict(prune.state_dict())
    assert prune.rounding_check == fresh.rounding_check == 4  # a resumed run prices the trim as rounded too, re-checked


def test_a_checkpoint_from_before_target_allocator_resumes_as_erk():
    from jointcompress.recipe import with_added_fields

    now = _recipe({"size_kb": 14.0}).model_dump(mode="json")
    before = {**now, "target": {k: v for k, v in now["target"].items() if k != "allocator"}}
    assert with_added_fields(before) == now


def test_a_file_far_under_its_size_target_is_said():
    from jointcompress import api
    from jointcompress.techniques.size_estimate import measured_bytes

    model, example = torch.nn.Sequential(torch.nn.Linear(4, 2)), torch.zeros(1, 4)
    size = measured_bytes(model, example)["total"]
    with pytest.warns(UserWarning, match=r"size target: the weights file would be [\d,]+ B, 50\.0% under"):
        api._warn_size_missed(model, example, 2 * size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        api._warn_size_missed(model, example, 1.05 * size)  # near its target: nothing to say


def test_target_allocator_sensitivity_shares_the_bytes_by_a_scan_of_the_model_with_the_runs_evaluate(digits_teacher):
    """allocator: sensitivity scans the model compress() starts from with its own evaluate (each layer pruned and
    rounded alone) and allocates from the scan, where erk allocates from the shapes alone."""
    split, teacher = digits_teacher
    evaluate = evaluator(split.x_test, split.y_test)
    data = _recipe({"size_kb": 6.6, "allocator": "sensitivity"}, epochs=1).model_dump()
    data["training"]["batch_size"] = 256
    expected = resolve_target(teacher, data, split.x_train[:2], evaluate=evaluate)
    erk = resolve_target(teacher, _recipe({"size_kb": 6.6}, epochs=1), split.x_train[:2])
    budgets = lambda r: (r.technique("prune_unstructured").layer_sparsity, r.technique("quant_lsq").layer_bits)  # noqa: E731
    assert budgets(expected) != budgets(erk)
    result = compress(copy.deepcopy(teacher), data, (split.x_train, split.y_train), evaluate, teacher=teacher)
    assert budgets(result.recipe) == budgets(expected)
    with pytest.raises(TargetError, match=r"target.allocator: sensitivity scans the model with an evaluate function"):
        resolve_target(teacher, data, split.x_train[:2])  # nothing to scan with
    joint = {**data, "mode": "joint", "techniques": [{"type": "quant_lsq", "zero_level": True}, {"type": "size_budget"}]}
    with pytest.warns(UserWarning, match=r"allocator: sensitivity .* mode: joint learns its own .* not read"):
        resolve_target(teacher, joint, split.x_train[:2], evaluate=evaluate)


def test_under_torchrun_the_allocation_scan_reads_each_setting_averaged_over_the_ranks():
    """Each rank's evaluate may read its share of the data: the scan, on every rank, averages each reading."""
    from jointcompress import api

    class TwoRanks:  # the other rank read 0.7 and 3.0
        def mean_metrics(self, metrics):
            return {k: (v + {"accuracy": 0.7, "value": 3.0}[k]) / 2 for k, v in metrics.items()}

    assert api._averaged(lambda m: {"accuracy": 0.9}, TwoRanks())(None) == {"accuracy": pytest.approx(0.8)}
    assert api._averaged(lambda m: 1.0, TwoRanks())(None) == pytest.approx(2.0)


def test_target_refit_on_rounding_false_keeps_the_masks_lsq_first_rounds(digits_teacher):
    """The re-fit on LSQ's rounding let weights back in mid-QAT and cut them again; at 2 bits on LeNet-300-100 the
    runs without it read better (BENCHMARKS.md), so it can be turned off: checked, said in the history, not done."""
    from jointcompress.compare import variant_recipe

    split, teacher = digits_teacher
    data = _recipe({"size_kb": 4.0}, epochs=3).model_dump()
    data["mode"] = "sequential"
    data["techniques"][1]["bits"] = 2
    data["target"]["refit_on_rounding"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the file lands under its target, and says so
        result = compress(copy.deepcopy(teacher), data, (split.x_train, split.y_train),
                          evaluator(split.x_test, split.y_test), teacher=teacher)
    order = [e["event"] for e in result.history.events if e["event"].startswith("size_")]
    assert order == ["size_steering", "size_rounding_check", "size_trim"]
    check = next(e for e in result.history.events if e["event"] == "size_rounding_check")
    assert check["predicted_bytes"] < 0.95 * 4096 and not check["refit"]  # far under its goal, and left there
    budgets = parse_recipe({**_recipe({"size_kb": 4.0}).model_dump(), "mode": "sequential"})
    assert not variant_recipe(budgets, "sequential-norefit", 0).target.refit_on_rounding
    assert variant_recipe(budgets, "sequential", 0).target.refit_on_rounding

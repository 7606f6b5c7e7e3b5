"""Recipe values at the edges that a run once accepted and then ignored without a word: a window that
closes on the run's end, a metric where lower is better, a metric read as NaN, selection patterns
that match no layer, a global floor above the asked keep, numbers out of range."""
import warnings

import pytest
import torch
import torch.nn as nn

from session_helpers import train_in_own_loop


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _data():
    torch.manual_seed(1)
    return torch.randn(64, 16), torch.randint(0, 4, (64,))


@pytest.mark.parametrize("steps, window", [(6, {"start": 1.0, "end": 1.0}), (1, {}), (5, {"start": 0.9, "end": 1.0})],
                         ids=["start_end_1", "one_step_default_end", "end_1"])
def test_a_pruning_window_that_closes_at_the_runs_end_still_reaches_its_sparsity(steps, window):
    """The window closed at step `total_steps`, which never runs: the masks never got their final keep and
    the model ended unpruned (asked 0.5, got 0.0)."""
    model, (x, y) = _mlp(), _data()
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, **window}]}
    train_in_own_loop(model, recipe, x, y, steps=steps).finalize(x[:2])
    for i in (0, 2):
        assert float((model[i].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_channels_and_quantizers_that_start_at_the_runs_end_are_applied():
    model, (x, y) = _mlp(), _data()
    recipe = {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "start": 1.0, "end": 1.0},
                             {"type": "quant_lsq", "bits": 2, "start": 1.0}]}
    spec = train_in_own_loop(model, recipe, x, y, steps=4).finalize(x[:2])
    assert model[0].out_features == 16 and model[2].out_features == 16
    assert spec.layers and all(ls.bits == 2 for ls in spec.layers.values())
    assert len(torch.unique(model[2].weight[0])) <= 4  # on a 2-bit grid


def _epochs_kept(metric: str, readings: list[float], **training) -> tuple[int | None, list]:
    """compress() for len(readings) epochs whose evaluate() returns the next reading as `metric`; the kept epoch."""
    from jointcompress import compress

    model, (x, y) = _mlp(), _data()
    it = iter([*readings, 0.0])  # and the one after the run
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.0}],
              "training": {"epochs": len(readings), "batch_size": 32, "metric": metric, **training}}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = compress(model, recipe, (x, y), lambda m: {metric: next(it)})
    return result.history.best_epoch, [str(w.message) for w in seen]


def test_a_loss_as_the_metric_keeps_its_lowest_epoch():
    """A metric read as higher-is-better whatever its name: training.metric 'eval_loss' kept the worst epoch."""
    assert _epochs_kept("eval_loss", [0.9, 0.5, 0.7])[0] == 2
    assert _epochs_kept("accuracy", [0.5, 0.9, 0.7])[0] == 2
    assert _epochs_kept("score_loss", [0.9, 0.5, 0.7], greater_is_better=True)[0] == 1


@pytest.mark.parametrize(("metric", "rises"), [
    ("neg_mse", True), ("neg_mean_squared_error", True), ("neg_log_loss", True), ("negative_loss", True),
    ("val_neg_mse", True), ("eval_neg_log_loss", True), ("loss_reduction", True), ("error_reduction", True),
    ("mae_improvement", True), ("eval_loss", False), ("f1", True), ("top1_error", False),
    ("neg_f1", True), ("negative_recall", True), ("drop_f1", True), ("fall_detection_accuracy", True)])
def test_a_metrics_direction_follows_a_negation_or_a_word_of_change_in_its_name(metric, rises):
    """scikit-learn's neg_mse (higher is better) was read as lower-is-better for its "mse", and the run kept its
    worst epoch without a word; so were loss_reduction and error_reduction. A negation turns only a word of loss
    or error after it: neg_f1 (the negative class's F1) rises."""
    from jointcompress.recipe import Training

    assert Training(metric=metric).metric_rises() is rises
    assert _epochs_kept(metric, [-2.3, -2.0, -2.1] if rises else [0.9, 0.5, 0.7])[0] == 2


def test_an_epoch_read_as_nan_is_never_the_best_and_is_said():
    """The NaN was kept first, then every comparison with it failed: the run ended with that epoch."""
    best, said = _epochs_kept("accuracy", [float("nan"), 0.6, 0.8, 0.7])
    assert best == 3 and any("returned NaN for 'accuracy' at epoch 1" in m for m in said)


@pytest.mark.parametrize("data, field", [({"target": {"size_kb": float("inf")}}, "target.size_kb"),
                                         ({"target": {"latency_ms": float("inf"), "batch": 1}}, "target.latency_ms"),
                                         ({"training": {"seed": 2 ** 32}}, "training.seed")])
def test_numbers_that_failed_after_training_began_are_refused_by_the_recipe(data, field):
    """An infinite size target overflowed at the first size check, an infinite latency target cut nothing
    and said it was met; a seed past 2**32 failed in numpy
    after the teacher had trained. Both now fail at validation, naming the field."""
    from jointcompress.errors import RecipeError
    from jointcompress.recipe import parse_recipe

    with pytest.raises(RecipeError, match=field):
        parse_recipe({"techniques": [{"type": "quant_lsq"}], **data})


def test_a_selection_pattern_that_matches_no_module_is_said():
    """exclude: [fc_2] (meant 2, the second Linear) compressed that layer anyway, without a word. Several
    targets patterns (one per model family, as the shipped hf recipe has) are not warned about."""
    import jointcompress

    model, (x, _) = _mlp(), _data()
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "exclude": ["fc_2", "4"]},
                             {"type": "quant_lsq", "exclude": ["lin*"]}]}
    with pytest.warns(UserWarning) as seen:
        jointcompress.prepare(model, recipe, total_steps=2, example_inputs=x[:2])
    said = [str(w.message) for w in seen]
    assert any("techniques[0] (prune_unstructured): exclude pattern 'fc_2' matches no module" in m for m in said)
    assert any("techniques[1] (quant_lsq): exclude pattern 'lin*' matches no module" in m for m in said)
    assert not any("pattern '4'" in m for m in said)
    recipe = {"techniques": [{"type": "quant_lsq", "targets": ["0", "*encoder.layer.*"]}]}  # one pattern per family
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="techniques")
        jointcompress.prepare(_mlp(), recipe, total_steps=2, example_inputs=x[:2])


@pytest.mark.parametrize("kwargs, said", [({"teacher": "model.pt"}, "teacher is str, not a torch.nn.Module"),
                                          ({"progress": 5}, "progress is int, not a function"),
                                          ({"loss_fn": 3}, "loss_fn is int, not a function"),
                                          ({"callbacks": 5}, "callbacks is int; pass a list")])
def test_compress_names_an_argument_of_the_wrong_kind(kwargs, said):
    from jointcompress import compress
    from jointcompress.data import evaluator
    from jointcompress.errors import RecipeError

    model, (x, y) = _mlp(), _data()
    with pytest.raises(RecipeError, match=said):
        compress(model, {"techniques": [{"type": "quant_lsq"}]}, (x, y), evaluator(x, y), **kwargs)


def test_a_run_dir_that_is_a_file_is_refused_before_training(tmp_path):
    from jointcompress import compress
    from jointcompress.data import evaluator
    from jointcompress.errors import RecipeError

    (tmp_path / "afile").write_text("mine")
    model, (x, y) = _mlp(), _data()
    with pytest.raises(RecipeError, match="run_dir .* is a file"):
        compress(model, {"techniques": [{"type": "quant_lsq"}]}, (x, y), evaluator(x, y), run_dir=tmp_path / "afile")


def test_evaluation_data_is_checked_when_the_evaluator_is_made():
    """Empty or out-of-range evaluation data scored 0 without a word; mismatched or numpy data failed
    only after the first epoch's training."""
    from jointcompress.data import evaluator
    from jointcompress.errors import DataError

    model, (x, y) = _mlp(), _data()
    with pytest.raises(DataError, match="no samples"):
        evaluator(x[:0], y[:0])
    with pytest.raises(DataError, match="64 inputs but 32 labels"):
        evaluator(x, y[:32])
    with pytest.raises(DataError, match="must be torch tensors"):
        evaluator(x.numpy(), y.numpy())
    with pytest.raises(DataError, match="labels go up to 13, but the model gives 4 classes"):
        evaluator(x, y + 10)(model)
    assert 0.0 <= evaluator(x, y)(model)["accuracy"] <= 1.0


def test_a_global_floor_above_the_asked_keep_is_said():
    """scope: global with min_keep 0.8 under sparsity 0.9 ended at 0.2 without a word (scope layer warned)."""
    import jointcompress

    model, (x, _) = _mlp(), _data()
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.9, "scope": "global", "min_keep": 0.8}]}
    with pytest.warns(UserWarning, match=r"min_keep 0.8 keeps more of every layer than sparsity 0.9 .* at most"):
        jointcompress.prepare(model, recipe, total_steps=2, example_inputs=x[:2])


def test_per_layer_settings_a_size_target_replaces_are_said():
    """layer_bits {fc1: 8} under a ratio target ran at the allocator's 5 bits (sequential) or dropped (joint)."""
    from jointcompress.recipe import parse_recipe
    from jointcompress.targets import warn_unused_sparsity

    recipe = parse_recipe({"mode": "sequential", "target": {"ratio": 10},
                           "techniques": [{"type": "prune_unstructured", "layer_sparsity": {"0": 0.1}},
                                          {"type": "quant_lsq", "layer_bits": {"0": 8}}]})
    with pytest.warns(UserWarning, match=r"prune_unstructured.layer_sparsity and quant_lsq.layer_bits are not used"):
        warn_unused_sparsity(recipe)


@pytest.mark.parametrize("data, said", [
    ({"techniques": [{"type": "distill_kd", "alpha": 0}]}, r"distill_kd: alpha: 0 without features distils nothing"),
    ({"hf": {"student_layers": [2, 0]}, "techniques": [{"type": "distill_kd"}]},
     r"hf.student_layers: \[2, 0\]: .* increasing order .*\[0, 2\]"),
    # [] read as "not given": a 6-layer student trained without a word
    ({"hf": {"student_layers": []}, "techniques": [{"type": "distill_kd"}]},
     r"hf.student_layers: \[\] keeps no layer: .* leave student_layers out to keep them all"),
])
def test_a_recipe_that_would_run_without_doing_what_it_says_is_refused(data, said):
    """distill_kd with alpha 0 and no features ran the teacher on every step for a loss of zero; hf.student_layers
    [2, 0] built a student that ran the teacher's layers in reverse. Neither said a word."""
    from jointcompress.errors import RecipeError
    from jointcompress.recipe import parse_recipe

    with pytest.raises(RecipeError, match=said):
        parse_recipe(data)
    if "hf" in data:  # the session's own way to a student (make_student) too
        from hf_helpers import tiny_bert
        from jointcompress.hf.student import make_student

        with pytest.raises(RecipeError, match=r"the layers to keep, \[2, 0\]: give them in increasing order"):
            make_student(tiny_bert(), [2, 0])


def test_a_size_budget_of_its_own_bytes_beside_a_target_is_said():
    """size_budget.target_bytes 9000 beside target.ratio 40: the run landed on the ratio's bytes, without a word
    (said, not refused: compare sets the target of such a recipe from --ratios)."""
    from jointcompress.recipe import parse_recipe

    techniques = [{"type": "quant_lsq", "zero_level": True}, {"type": "size_budget", "target_bytes": 9000}]
    with pytest.warns(UserWarning, match=r"size_budget.target_bytes \(9000\) beside target: the target's bytes replace"):
        parse_recipe({"mode": "joint", "target": {"ratio": 40}, "techniques": techniques})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_recipe({"mode": "joint", "techniques": techniques}).has_size_target()  # alone, it is the target


def test_a_sequential_recipe_whose_quantization_never_trains_is_refused_before_training():
    """sequential {prune: 1.0, quantize: 0, finetune_after_quantize: 0} (or a share under one step) beside quant_lsq
    ran without a word and stored 4-bit weights rounded after training, never trained at 4 bits."""
    from jointcompress import prepare
    from jointcompress.errors import RecipeError

    for quantize in (0.0, 0.004):  # no step, and a share under one of the run's 100 steps
        phases = {"prune": 1.0 - quantize, "finetune_after_prune": 0.0, "quantize": quantize, "finetune_after_quantize": 0.0}
        recipe = {"mode": "sequential", "sequential": phases,
                  "techniques": [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq"}]}
        with pytest.raises(RecipeError, match=r"leave quant_lsq .* no step of the run's 100"):
            prepare(_mlp(), recipe, total_steps=100)
    recipe["techniques"] = recipe["techniques"][:1]  # no quantization: nothing to train
    prepare(_mlp(), recipe, total_steps=100)


def test_a_quantization_start_that_sequential_does_not_read_is_said():
    """mode: sequential starts LSQ at its quantize phase: quant_lsq.start 0.3 was dropped without a word. A run
    that starts (prepare, compress) says so, naming where LSQ starts instead; joint reads it and is silent, and
    compare's sequential variant of a joint recipe that sets it drops it without warning its user about a field
    they set for the joint runs."""
    from jointcompress.compare import variant_recipe
    from jointcompress.recipe import parse_recipe

    from jointcompress import prepare

    techniques = [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq", "start": 0.3}]
    with pytest.warns(UserWarning, match=r"quant_lsq.start \(0.3\) is not read in mode: sequential, which starts LSQ "
                                         r"at its quantize phase \(0.5 of the run"):
        prepare(_mlp(), {"mode": "sequential", "techniques": techniques}, total_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_recipe({"mode": "sequential", "techniques": techniques})  # said where a run starts, not on every parse
        joint = parse_recipe({"mode": "joint", "techniques": techniques})
        prepare(_mlp(), joint, total_steps=10)
        sequential = variant_recipe(joint, "sequential", seed=0)
    assert sequential.mode == "sequential" and sequential.technique("quant_lsq").start == 0.0
    assert joint.technique("quant_lsq").start == 0.3
    from jointcompress.targets import resolve_target

    with warnings.catch_warnings(record=True) as caught:  # the quant_lsq a sequential target adds sets no start
        warnings.simplefilter("always")
        resolved = resolve_target(_mlp(), {"mode": "sequential", "target": {"ratio": 10}, "techniques": []},
                                  _data()[0][:2])
    assert resolved.technique("quant_lsq") is not None
    assert not [w for w in caught if "quant_lsq.start" in str(w.message)]


def test_your_own_loop_is_told_what_a_size_target_replaces_as_compress_is():
    """prepare() ran a joint recipe with a ratio target, prune_unstructured.sparsity 0.9 and quant_lsq.layer_bits
    without a word, where compress() and the command line say both are not used."""
    from jointcompress import prepare

    recipe = {"mode": "joint", "target": {"ratio": 20}, "techniques": [
        {"type": "prune_unstructured", "sparsity": 0.9}, {"type": "quant_lsq", "bits": 4, "layer_bits": {"0": 2}}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(_mlp(), recipe, total_steps=20, example_inputs=_data()[0][:2])
    said = [str(w.message) for w in caught]
    assert any("prune_unstructured.sparsity 0.9 is not used" in m for m in said), said
    assert any("quant_lsq.layer_bits is not used" in m for m in said), said


def test_a_run_that_compresses_nothing_is_said_but_training_a_reference_is_not():
    """techniques: [] trained to the end, exit 0, at 1.0x, without a word; train_baseline (no technique on
    purpose) stays silent; distillation alone is said only where the student is a copy (the command line)."""
    from jointcompress import compress, prepare
    from jointcompress.api import train_baseline
    from jointcompress.data import evaluator
    from jointcompress.recipe import CompressesNothing, compresses_nothing, parse_recipe

    x, y = _data()
    with pytest.warns(CompressesNothing, match="techniques is empty, so the run trains and compresses nothing"):
        prepare(_mlp(), {"techniques": []}, total_steps=5)
    with pytest.warns(CompressesNothing, match="techniques is empty"):
        compress(_mlp(), {"techniques": [], "training": {"epochs": 1}}, (x, y), evaluator(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressesNothing)
        train_baseline(_mlp(), (x, y), evaluator(x, y), epochs=1)
        prepare(_mlp(), {"techniques": [{"type": "distill_kd"}]}, total_steps=5, teacher=_mlp())  # a smaller student may be yours
    distill_only = parse_recipe({"techniques": [{"type": "distill_kd"}]})
    assert "student is a copy of the teacher" in compresses_nothing(distill_only, student_is_copy=True)
    assert compresses_nothing(parse_recipe({"target": {"ratio": 10}, "techniques": []}), student_is_copy=True) is None


def test_the_result_holds_the_kept_epochs_metrics_without_evaluating_again():
    """evaluate ran once more after the run (epochs + 1 calls: a whole evaluation more), and an evaluate that draws
    returned other numbers in result.metrics than those the kept epoch was chosen on."""
    from jointcompress import compress

    model, (x, y) = _mlp(), _data()
    readings = iter([0.5, 0.9, 0.7])
    calls = []

    def evaluate(m):
        calls.append(1)
        return {"accuracy": next(readings), "loss": 0.1 * len(calls)}

    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.0}],
              "training": {"epochs": 3, "batch_size": 32}}
    result = compress(model, recipe, (x, y), evaluate)
    assert len(calls) == 3 and result.history.best_epoch == 2
    assert result.metrics == {"accuracy": 0.9, "loss": pytest.approx(0.2)}
    readings, calls[:] = iter([0.5, 0.9, 0.7]), []
    last = {**recipe, "training": {**recipe["training"], "keep": "last"}}
    result = compress(_mlp(), last, (x, y), evaluate)
    assert len(calls) == 3 and result.metrics == {"accuracy": 0.7, "loss": pytest.approx(0.3)}


def test_a_recipe_error_names_the_likely_technique_type_and_shows_an_entry_once():
    """A misspelled type listed the types twice (pydantic's words, then 'Allowed types') with no likely fix; a check
    of one entry (end before start) repeated the whole entry after its own words, and two targets their keys twice."""
    from jointcompress.errors import RecipeError
    from jointcompress.recipe import parse_recipe

    with pytest.raises(RecipeError, match=r"unknown technique type 'quant_lqs' \(did you mean 'quant_lsq'\?\)") as err:
        parse_recipe({"techniques": [{"type": "quant_lqs"}]})
    assert str(err.value).count("prune_blocks") == 1
    with pytest.raises(RecipeError, match="a technique without a type"):
        parse_recipe({"techniques": [{"bits": 4}]})
    with pytest.raises(RecipeError) as err:
        parse_recipe({"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "start": 0.8, "end": 0.2}]})
    assert "end (0.2) must be >= start (0.8)" in str(err.value) and "(got {" not in str(err.value)
    with pytest.raises(RecipeError) as err:
        parse_recipe({"target": {"ratio": 20, "size_kb": 10}, "techniques": [{"type": "quant_lsq"}]})
    assert str(err.value).count("(got ") == 1


def test_more_micro_batches_than_samples_in_a_batch_is_refused():
    """micro_batches 16 of a batch of 4 on a model without BatchNorm was accepted without a word."""
    from jointcompress.errors import RecipeError
    from jointcompress.recipe import parse_recipe

    with pytest.raises(RecipeError, match=r"training: micro_batches \(16\) is more than batch_size \(4\)"):
        parse_recipe({"techniques": [{"type": "quant_lsq"}], "training": {"batch_size": 4, "micro_batches": 16}})
    assert parse_recipe({"techniques": [{"type": "quant_lsq"}], "training": {"batch_size": 4, "micro_batches": 4}})


def test_an_unknown_key_names_the_likely_one_in_its_own_section():
    """"hf.max_lenght: unknown key" said nothing of max_length, where a misspelled technique type names its match."""
    from jointcompress.errors import RecipeError
    from jointcompress.recipe import parse_recipe

    quant = {"techniques": [{"type": "quant_lsq"}]}
    for recipe, said in (({"techniques": [{"type": "quant_lsq", "bit": 4}]}, "quant_lsq.bit: unknown key (did you mean 'bits'?)"),
                         ({**quant, "hf": {"max_lenght": 8}}, "hf.max_lenght: unknown key (did you mean 'max_length'?)"),
                         ({**quant, "training": {"epoch": 2}}, "training.epoch: unknown key (did you mean 'epochs'?)"),
                         ({**quant, "trainig": {}}, "trainig: unknown key (did you mean 'training'?)"),
                         ({**quant, "zzz": 1}, "zzz: unknown key; remove it")):
        with pytest.raises(RecipeError) as err:
            parse_recipe(recipe)
        assert said in str(err.value), str(err.value)

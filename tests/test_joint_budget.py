"""Joint pruning + quantization under one size budget: zero as a quantizer level, learned
bit-widths, a byte estimate checked against the writer, and a run that lands on its target."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from jointcompress.api import compress
from jointcompress.artifact import packing
from jointcompress.artifact.store import save
from jointcompress.compare import joint_recipe
from jointcompress.coordination import GradientCoordinator
from jointcompress.data import evaluator, load_digits
from jointcompress.errors import RecipeError
from jointcompress.finalize import finalize
from jointcompress.pipeline import train_teacher
from jointcompress.recipe import Coordination, parse_recipe
from jointcompress.targets import target_bytes
from jointcompress.techniques.size_estimate import sparse_layer_bytes, sparse_layer_bytes_with_slopes
from jointcompress.techniques.zero_level import ZeroLevelLSQWeight


@pytest.fixture(scope="module")
def trained():
    split = load_digits()
    return split, train_teacher("lenet300", split, 3)


def _joint(ratio=30.0, epochs=5, strategy="none", batch_size=16, **quant):
    return parse_recipe({"model": "lenet300", "mode": "joint", "target": {"ratio": ratio}, "techniques": [
        {"type": "quant_lsq", "bits": 4, "zero_level": True, **quant},
        {"type": "size_budget", "end": 0.6, "freeze": 0.8},
        {"type": "distill_kd", "cache_teacher": True}],
        "training": {"epochs": epochs, "batch_size": batch_size, "lr": 0.002},
        "coordination": {"strategy": strategy, "every": 5}})


@pytest.mark.parametrize("density", [0.01, 0.05, 0.2, 0.6, 0.95])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_byte_estimate_matches_the_writer_on_random_layers(density, bits):
    rng = np.random.default_rng(bits * 100 + int(density * 100))
    numel = 40_000
    q = rng.integers(1, 2 ** (bits - 1), numel) * rng.choice([-1, 1], numel)
    q = np.where(rng.random(numel) < density, q, 0).astype(np.int8)
    real = packing.encode_ints(q, bits).nbytes
    est = float(sparse_layer_bytes(torch.tensor(float(np.count_nonzero(q))), numel, torch.tensor(float(bits))))
    assert abs(est - real) / real < 0.03, (est, real)


def test_a_layer_still_stored_dense_feels_the_size_gradient():
    # at 90% density the dense format is cheapest and its bytes do not depend on the count; the
    # gradient must still say what each kept weight will cost (else dense layers never prune)
    n = torch.tensor(36_000.0, requires_grad=True)
    est = sparse_layer_bytes(n, 40_000, torch.tensor(4.0))
    assert float(est) == 40_000 * 4 / 8  # the value is the dense format's
    (g,) = torch.autograd.grad(est, n)
    assert g >= 4 / 8  # at least the value bits of a kept weight, in bytes


@pytest.mark.parametrize("seed", range(6))
def test_the_closed_form_slopes_of_the_estimate_are_autograds(seed):
    """sparse_layer_bytes_with_slopes gives the estimate's value and its autograd gradient to float
    rounding, in every format's regime (dense, bitmask, every index width)."""
    g = torch.Generator().manual_seed(seed)
    numel = [int(v) for v in torch.randint(50, 300_000, (8,), generator=g)]
    nonzero = (torch.rand(8, generator=g) ** 3 * torch.tensor(numel, dtype=torch.float32)).round()
    nonzero[0] = 0.0  # under clamp(min=1): no gradient
    bits = torch.randint(2, 9, (8,), generator=g).float()
    n, b = nonzero.clone().requires_grad_(True), bits.clone().requires_grad_(True)
    value = sparse_layer_bytes(n, numel, b)
    d_n, d_b = torch.autograd.grad(value.sum(), (n, b))
    closed = [torch.tensor(v) for v in sparse_layer_bytes_with_slopes(nonzero.tolist(), numel, bits.tolist())]
    assert torch.allclose(closed[0], value.detach(), rtol=1e-6)  # double precision against float
    assert torch.allclose(closed[1], d_n, rtol=1e-3, atol=1e-6) and torch.allclose(closed[2], d_b, rtol=1e-3, atol=1e-6)
    assert closed[1][0] == 0


def test_the_size_term_node_gives_the_estimates_loss_and_gradient(trained):
    """SizeTerm (one node, closed-form backward) against the size term recorded through autograd
    (estimate(), as before): the same loss, the same gradients on counts, dead zones and widths."""
    from jointcompress.recipe import SizeBudget as SizeBudgetConfig
    from jointcompress.techniques.base import RunContext
    from jointcompress.techniques.size_budget import SizeBudget

    split, teacher = trained
    model = copy.deepcopy(teacher)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for layer in layers:
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", ZeroLevelLSQWeight(layer.weight.detach(), 4))
    model(split.x_train[:2])  # initializes the steps
    budget = SizeBudget(SizeBudgetConfig(type="size_budget", target_bytes=target_bytes(teacher, parse_recipe(
        {"target": {"ratio": 30.0}}).target), penalty=30.0))
    budget.setup(RunContext(model=model, example_inputs=split.x_train[:2], total_steps=100))
    budget.lam = 0.7
    ctx = RunContext(model=model, example_inputs=split.x_train[:2], total_steps=100)
    ctx.step = 40
    params = [p for _, q in budget.layers.values() for p in (q.dead_zone_raw, q.log_step, q.bits_raw)]
    grads = []
    for closed in (True, False):
        model(split.x_train[:32])  # a forward: the counts the term reads
        if closed:
            loss = budget.loss_terms(ctx)["size"]
        else:
            c = budget.estimate(soft=True) / budget.goal(ctx.step) - 1
            loss = budget.lam * c + 0.5 * budget.config.penalty * c * c
        grads.append((loss.detach(), torch.autograd.grad(loss, params)))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5) and float(grads[0][0]) != 0
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)
    assert any(bool(g.abs().sum() > 0) for g in grads[0][1])


def test_dead_zone_prunes_and_keeps_weights_on_the_grid():
    torch.manual_seed(0)
    w = torch.randn(6, 50)
    q = ZeroLevelLSQWeight(w, bits=4)
    with torch.no_grad():
        q.dead_zone_raw.fill_(1.0)  # t = 0.5 + softplus(1) = 1.81 steps
    out = q(w)
    s = q.scale().view(-1, 1)
    ints = out / s
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    kept = ints != 0
    assert (ints[kept].abs() >= 1).all() and (ints.abs() <= 7).all()
    assert torch.equal(kept, (w / s).abs() >= q.dead_zone())  # zero exactly inside the dead zone
    assert 0.2 < 1 - kept.float().mean() < 0.95


def test_dead_zone_gets_opposite_gradients_from_task_and_size():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    q = ZeroLevelLSQWeight(w, bits=4)
    target = torch.randn(4, 64) + 3 * w  # a task that wants the weights as they are
    task = ((q(w) - target) ** 2).mean()
    g_task = torch.autograd.grad(task, q.dead_zone_raw)[0]
    g_size = torch.autograd.grad(q.soft_nonzero(w), q.dead_zone_raw)[0]
    assert (g_task > 0).all()  # opening the dead zone costs accuracy
    assert (g_size < 0).all()  # ... and saves bytes: a real conflict


def _run(trained, recipe):
    split, teacher = trained
    model = copy.deepcopy(teacher)
    result = compress(model, recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test), teacher=teacher)
    return model, result


def test_constrained_run_lands_on_target(trained, tmp_path):
    split, teacher = trained
    recipe = _joint(ratio=30.0, learn_bits=False)
    model, result = _run(trained, recipe)
    masked_logits = model(split.x_test[:64]).detach()
    spec = finalize(model, result.example_inputs)
    assert torch.allclose(model(split.x_test[:64]), masked_logits, rtol=1e-4, atol=1e-5)  # finalize keeps the logits
    manifest = save(model, spec, tmp_path / "a", example_inputs=result.example_inputs)
    goal = target_bytes(teacher, recipe.target)
    assert abs(manifest["weights_file_bytes"] - goal) / goal < 0.02
    zeros = 0
    for name, layer in dict(model.named_modules()).items():
        if name in spec.layers:
            ints = layer.weight / spec.layers[name].scale.view(-1, 1)
            assert torch.allclose(ints, ints.round(), atol=1e-3)  # every kept weight on its channel's grid
            assert (ints.round().abs() <= 2 ** (spec.layers[name].bits - 1) - 1).all()
            zeros += int((layer.weight == 0).sum())  # pruned weights are exact zeros
    assert zeros / sum(r["numel"] for r in manifest["layers"].values()) > 0.5
    assert result.metrics["accuracy"] > 0.8


def test_coordination_strategies_change_the_update_when_size_conflicts():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(32))
    target = 2 * w.detach() + 0.3 * torch.randn(32)  # the task wants larger weights, the size term smaller ones
    changed = {}
    for strategy in ("none", "scale", "pcgrad"):
        coord = GradientCoordinator(Coordination(strategy=strategy, every=1, threshold=0.1), {"weights": [w]})
        w.grad = None
        terms = {"task": ((w - target) ** 2).sum(), "size": 0.5 * (w ** 2).sum()}  # size pulls to 0, task to target
        changed[strategy] = coord.backward(terms, step=0).changed
    assert changed["none"] == 0.0
    assert changed["scale"] > 0.0 and changed["pcgrad"] > 0.0


def test_size_budget_recipe_errors_name_the_fix():
    base = {"mode": "joint", "target": {"ratio": 10}, "techniques": [{"type": "quant_lsq"}, {"type": "size_budget"}]}
    with pytest.raises(RecipeError, match="zero_level: true"):
        parse_recipe(base)
    with pytest.raises(RecipeError, match="mode: joint"):
        parse_recipe({**base, "mode": "sequential", "techniques": [{"type": "quant_lsq", "zero_level": True}, {"type": "size_budget"}]})
    with pytest.raises(RecipeError, match="target"):
        parse_recipe({**base, "target": None, "techniques": [{"type": "quant_lsq", "zero_level": True}, {"type": "size_budget"}]})
    with pytest.raises(RecipeError, match="min_bits"):
        parse_recipe({"techniques": [{"type": "quant_lsq", "zero_level": True, "min_bits": 6, "max_bits": 4}]})


class _Embedded(nn.Module):
    """A Linear classifier behind a lookup table the quantizer never touches (an Embedding)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.table(x).mean(1))


def test_a_target_under_the_bytes_training_cannot_move_is_refused_before_training():
    torch.manual_seed(0)
    x, y = torch.randint(0, 64, (16, 5)), torch.randint(0, 4, (16,))
    recipe = {"mode": "joint", "target": {"ratio": 8}, "training": {"epochs": 1, "batch_size": 8},
              "techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True}, {"type": "size_budget"}]}
    from jointcompress.targets import TargetError

    # the table alone (64 x 32 fp32 = 8,192 B) is far above an eighth of the model's fp32 file
    with pytest.raises(TargetError, match=r"table.weight 8,192 B.*Raise target"):
        compress(_Embedded(), recipe, (x, y), lambda m: 0.0)
    recipe["target"] = {"ratio": 1.05}  # just above those bytes: not refused, the run trains
    result = compress(_Embedded(), recipe, (x, y), lambda m: 0.0)
    assert result.techniques[1].fixed >= 8192 and result.history.steps


def test_joint_form_of_a_prune_quantize_recipe():
    seq = parse_recipe({"mode": "sequential", "target": {"ratio": 40}, "techniques": [
        {"type": "prune_unstructured", "sparsity": 0.9, "start": 0.1, "end": 0.5},
        {"type": "quant_lsq", "bits": 4, "start": 0.3}, {"type": "distill_kd"}]})
    joint = joint_recipe(seq)
    assert joint.mode == "joint" and joint.technique("prune_unstructured") is None
    assert joint.technique("quant_lsq").zero_level and joint.technique("quant_lsq").start == 0.0
    budget = joint.technique("size_budget")
    assert (budget.start, budget.end) == (0.1, 0.5) and joint.technique("distill_kd") is not None


@pytest.mark.parametrize("fmt", ["fp16", "log8"])
def test_dead_zone_output_is_exactly_on_the_stored_grid(fmt):
    # the forward's step must equal the stored step bit for bit (an ulp off puts q*s off the grid)
    torch.manual_seed(3)
    w = torch.randn(64, 200) * torch.rand(64, 1) * 3
    q = ZeroLevelLSQWeight(w, bits=4)
    q.step_format = fmt
    with torch.no_grad():
        q.log_step.normal_(-1.0, 0.7)
    out = q(w).detach()
    ints = out / q.scale().view(-1, 1)
    assert (ints - ints.round()).abs().max() < 1e-5  # the writer allows 1e-3; fp32 rounding of q * s is ~1e-7


def test_a_target_met_before_any_decision_is_said_at_fixed_widths():
    """At fixed 4-bit widths a quarter of the fp32 file is met with nothing pruned: the run warns
    with the fix and records it; learned widths spend the slack on precision (recorded, no warning)."""
    import warnings

    torch.manual_seed(0)
    x, y = torch.randn(32, 20), torch.randint(0, 4, (32,))
    recipe = {"mode": "joint", "target": {"ratio": 4}, "training": {"epochs": 1, "batch_size": 8},
              "techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True, "learn_bits": False},
                             {"type": "size_budget"}]}
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    with pytest.warns(UserWarning, match=r"size_budget: the model at its fixed bit-widths .*\(quant_lsq.learn_bits: true with size_budget written"):
        result = compress(model, recipe, (x, y), lambda m: 0.0)
    budget = result.techniques[1]
    slack = [e for e in budget.events if e["event"] == "size_budget_slack"]
    assert slack and slack[0]["start_bytes"] <= slack[0]["target_bytes"] and not slack[0]["learns_widths"]
    # the bytes only fall from there, so the budget never binds: its multiplier stays at 0 (it wound below zero, its
    # term pulling at the step sizes for weights it had none to give back)
    assert budget.never_binds and budget.lam == 0.0
    recipe["techniques"][0]["learn_bits"] = True
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="size_budget")
        result = compress(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)), recipe, (x, y), lambda m: 0.0)
    assert any(e["event"] == "size_budget_slack" and e["learns_widths"] for e in result.techniques[1].events)


def test_the_shipped_joint_recipe_is_the_one_the_benchmarks_measure():
    """recipes/lenet300_mnist_joint.yaml is joint-paced-obd-none at 100x exactly as compare_mnist.py builds it
    (so a user starting from it runs what BENCHMARKS.md reports)."""
    import importlib.util
    from pathlib import Path

    from jointcompress.compare import JOINT_OPTIONS
    from jointcompress.recipe import builtin_recipe, load_recipe

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_mnist.py"
    spec = importlib.util.spec_from_file_location("compare_mnist_for_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = bench.recipe("lenet300", 4).model_dump()
    base["target"] = {"ratio": 100}
    measured = joint_recipe(parse_recipe(base), **JOINT_OPTIONS["joint-paced-obd-none"])
    shipped = load_recipe(builtin_recipe("lenet300_mnist_joint"))
    def grid_read(t):  # quant_lsq.nonzero_grid unset means off at 4 bits, as the resolved recipe writes it
        dump = t.model_dump()
        return {**dump, "nonzero_grid": bool(dump["nonzero_grid"])} if dump["type"] == "quant_lsq" else dump

    assert [grid_read(t) for t in shipped.techniques] == [grid_read(t) for t in measured.techniques]
    # compare_mnist.py keeps BatchNorm's running averages (recalibrate_norms 0), as its stored results were
    # measured; LeNet-300-100 has no BatchNorm, so the shipped recipe keeps the library's default
    assert shipped.training.model_copy(update={"recalibrate_norms": 0}) == measured.training
    assert shipped.target == measured.target
    assert (shipped.mode, shipped.model, shipped.coordination.strategy) == ("joint", "lenet300", "none")
    # the README shows it: a copy of its block ran without scale_format: fp16 and at the default 10 epochs
    import textwrap

    import yaml

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("src/jointcompress/recipes/lenet300_mnist_joint.yaml`", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    shown = parse_recipe(yaml.safe_load(textwrap.dedent(block)))
    assert shown.model_dump(exclude={"name", "version"}) == shipped.model_dump(exclude={"name", "version"})


def test_a_slow_measurement_of_the_file_is_said_with_the_runs_count(monkeypatch):
    """Each calibration encodes the whole file (about a minute on BERT-base), some 40 a run, which no step time
    shows; one slower than the threshold (here 0 s) is said with the count and size_budget.calibrate_every."""
    from jointcompress.techniques import size_budget

    monkeypatch.setattr(size_budget, "CALIBRATION_WARN_SECONDS", 0.0)
    torch.manual_seed(0)
    x, y = torch.randn(64, 20), torch.randint(0, 4, (64,))
    recipe = {"mode": "joint", "target": {"ratio": 12}, "training": {"epochs": 1, "batch_size": 8},
              "techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True}, {"type": "size_budget"}]}
    with pytest.warns(UserWarning, match=r"size_budget: one measurement of the file .* took \d+ s, and this run makes "
                                         r"about \d+ before its landing .*size_budget.calibrate_every \(now 1 steps\)"):
        compress(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)), recipe, (x, y), lambda m: 0.0)


def test_a_state_far_under_its_aim_at_the_freeze_is_said_with_the_fix():
    """A probe's Conv1d model froze 18% under its aim with the multiplier at 10: the fixed pattern gave back
    thousands of weights with drifted values, 26 points under sequential, without a word."""
    from types import SimpleNamespace

    from jointcompress.techniques.size_budget import SizeBudget

    budget = SizeBudget.__new__(SizeBudget)
    budget.config, budget.lam = SimpleNamespace(anti_windup=False), 9.97
    with pytest.warns(UserWarning, match=r"at the freeze the model was 18% under its aim .*anti_windup: true"):
        budget.warn_overshoot(-0.18)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        budget.warn_overshoot(-0.02)  # within 5%: nothing to say
        budget.config.anti_windup = True
        budget.warn_overshoot(-0.18)  # the remedy is on


@pytest.mark.parametrize("schedule, named", [("log_linear", False), ("cubic", True)])
def test_the_overshoot_warning_names_log_linear_only_to_a_cubic_schedule(schedule, named):
    """A probe's run on the default schedule (log_linear) was told to set schedule: log_linear."""
    from types import SimpleNamespace

    from jointcompress.techniques.size_budget import SizeBudget

    budget = SizeBudget.__new__(SizeBudget)
    budget.config, budget.lam = SimpleNamespace(anti_windup=False, schedule=schedule), 9.97
    with pytest.warns(UserWarning, match="anti_windup: true") as caught:
        budget.warn_overshoot(-0.18)
    assert ("schedule: log_linear" in str(caught[0].message)) is named

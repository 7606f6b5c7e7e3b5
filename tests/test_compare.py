"""compare: every variant at every ratio with the same budgets; JSON, CSV, Pareto PNG, TensorBoard."""
import csv
import json

from typer.testing import CliRunner

from jointcompress.cli import app
from jointcompress.compare import pareto_front


def test_pareto_front():
    assert pareto_front([(10, 2.0), (20, 3.0), (20, 5.0), (15, 4.0)]) == [(10, 2.0), (20, 3.0)]


def test_compare_cli_tiny(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: lenet300\ndata: digits\ntechniques:\n"
        "  - {type: prune_unstructured, sparsity: 0.9, end: 0.6, regularization: 1.0}\n"
        "  - {type: quant_lsq, bits: 4, start: 0.3}\n"
        "training: {epochs: 1, batch_size: 128, lr: 0.002}\ncoordination: {every: 2, log_every: 2}\n")
    out, tb = tmp_path / "cmp", tmp_path / "tb"
    res = CliRunner().invoke(app, ["compare", str(recipe), "--ratios", "20", "--seeds", "1", "--first-seed", "1",
                                   "--teacher-epochs", "1", "--variants", "joint-pcgrad,sequential,overlap",
                                   "--out", str(out), "--tensorboard", str(tb)])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "compare.json").read_text())
    assert result["first_seed"] == 1 and {r["seed"] for r in result["runs"]} == {1}  # a later batch of seeds
    assert {r["variant"] for r in result["runs"]} == {"joint-pcgrad", "sequential", "overlap"}
    from jointcompress.data import load_digits

    assert result["train_images"] == len(load_digits().y_train)  # the training-set size the runs used
    for r in result["runs"]:
        manifest = json.loads((out / r["dir"] / "artifact" / "manifest.json").read_text())
        assert r["file_bytes"] == manifest["weights_file_bytes"]
        assert abs(r["file_bytes"] / r["target_bytes"] - 1) <= 0.02, r  # each variant steered onto the same size
        assert (out / r["dir"] / "history.json").is_file()
    recipes = {r["variant"]: json.loads((out / r["dir"] / "artifact" / "manifest.json").read_text())["recipe"]
               for r in result["runs"]}
    # sequential and overlap start from the allocator's per-layer budgets, the same for both
    assert recipes["sequential"]["techniques"][0]["layer_sparsity"] == recipes["overlap"]["techniques"][0]["layer_sparsity"]
    # the joint variant learns its own under the target's bytes
    budget = next(t for t in recipes["joint-pcgrad"]["techniques"] if t["type"] == "size_budget")
    joint_run = next(r for r in result["runs"] if r["variant"] == "joint-pcgrad")
    assert abs(budget["target_bytes"] - joint_run["target_bytes"]) < 1
    assert joint_run["changed_share"] > 0  # pcgrad changed the update on the size-vs-accuracy conflict
    summary = {s["variant"]: s for s in result["summary"]}
    assert not summary["joint-pcgrad"]["changed_nothing"]
    assert len(list(csv.DictReader((out / "compare.csv").open()))) == 3
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    events = list(tb.rglob("events.out.tfevents.*"))
    assert len(events) == 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent)).Reload()
    tags = acc.Tags()["scalars"]
    assert "loss/task" in tags and "coordination/conflict_rate" in tags


def test_early_freeze_variant_fine_tunes_its_fixed_pattern_for_most_of_the_run():
    """joint-early-*: the stiff budget reaches the target at 20% of the run, freezes at 30%, and the
    rest is its own LR phase from the full rate; the other joint variants keep their window."""
    from jointcompress.compare import JOINT_OPTIONS, joint_recipe
    from jointcompress.plan import joint_plan
    from jointcompress.recipe import parse_recipe
    from jointcompress.session.schedule import lr_factor
    from jointcompress.techniques.size_budget import SizeBudget

    seq = parse_recipe({"mode": "sequential", "target": {"ratio": 40}, "techniques": [
        {"type": "prune_unstructured", "sparsity": 0.9, "end": 0.6}, {"type": "quant_lsq", "bits": 4}]})
    early = joint_recipe(seq, **JOINT_OPTIONS["joint-early-none"])
    budget = early.technique("size_budget")
    assert (budget.end, budget.freeze, budget.penalty, budget.finetune_phase) == (0.2, 0.3, 30.0, True)
    assert early.technique("quant_lsq").learn_bits
    stiff = joint_recipe(seq, **JOINT_OPTIONS["joint-stiff-none"]).technique("size_budget")
    assert (stiff.end, stiff.freeze) == (0.6, 0.8)  # the variants measured before keep theirs
    t = SizeBudget(budget)
    plan = joint_plan([t], 1000)
    assert t.window == (0, 200) and plan.freeze[id(t)] == 300
    assert [(p.name, p.start, p.end) for p in plan.phases] == [("joint", 0, 300), ("finetune", 300, 1000)]
    assert lr_factor(300, plan, "cosine") == 1.0 and lr_factor(299, plan, "cosine") < 0.02


def test_paced_window_decides_in_a_fixed_number_of_steps_and_fine_tunes_the_rest():
    """joint-paced-*: the decision window is ~1,000 steps whatever the run's length (between 20% and
    60% of it), the freeze half a window later (at most 80%)."""
    from jointcompress.compare import JOINT_OPTIONS, joint_options, joint_recipe, paced_window
    from jointcompress.recipe import parse_recipe

    assert paced_window(1000, 640) == {"end": 0.6, "freeze": 0.8}  # short run: the default window
    assert paced_window(1000, 1876) == {"end": 0.533, "freeze": 0.7995}
    assert paced_window(1000, 4690) == {"end": 0.2132, "freeze": 0.3198}
    assert paced_window(1000, 50_000) == {"end": 0.2, "freeze": 0.3}  # never fewer than 20% deciding
    # from a later start (the budget after prune_structured's channels): the same steps of decisions
    assert paced_window(1000, 10_000, start=0.2) == {"end": 0.3, "freeze": 0.35}
    assert paced_window(1000, 938, start=0.2) == {"end": 0.6, "freeze": 0.8}  # a short run: as from step 0
    seq = parse_recipe({"mode": "sequential", "target": {"ratio": 40}, "techniques": [
        {"type": "prune_unstructured", "sparsity": 0.9, "end": 0.6}, {"type": "quant_lsq", "bits": 4}]})
    budget = joint_recipe(seq, **joint_options("joint-paced-none", 4690)).technique("size_budget")
    assert (budget.end, budget.freeze, budget.penalty, budget.saliency) == (0.2132, 0.3198, 30.0, 30.0)
    assert "decide_steps" in JOINT_OPTIONS["joint-paced-none"]  # resolved, never passed to the recipe
    unpaced = joint_recipe(seq, **joint_options("joint-paced-none")).technique("size_budget")
    assert (unpaced.end, unpaced.freeze) == (0.6, 0.8)  # no step count (the demo): the default window


def test_acc_pcgrad_variant_coordinates_accuracy_as_one_and_leaves_the_others_as_the_recipe_says():
    from jointcompress.compare import variant_recipe
    from jointcompress.recipe import parse_recipe

    base = parse_recipe({"techniques": [{"type": "quant_lsq", "bits": 4}],
                         "coordination": {"accuracy_as_one": False}})  # per term, as compare_mnist.py's recipe
    grouped = variant_recipe(base, "joint-acc-pcgrad", seed=3)
    assert grouped.coordination.strategy == "pcgrad" and grouped.coordination.accuracy_as_one
    for variant in ("joint-pcgrad", "joint-none", "sequential"):
        assert not variant_recipe(base, variant, seed=3).coordination.accuracy_as_one
    default = parse_recipe({"techniques": [{"type": "quant_lsq", "bits": 4}]})  # the library's default: accuracy as one
    assert variant_recipe(default, "joint-pcgrad", seed=3).coordination.accuracy_as_one

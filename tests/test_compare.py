"""compare: every variant at every ratio with the same budgets; JSON, CSV, Pareto PNG, TensorBoard."""
import csv
import json
import shlex
import sys
from pathlib import Path

import pytest

from typer.testing import CliRunner

from jointcompress.cli import app
from jointcompress.compare import pareto_front


def test_pareto_front():
    assert pareto_front([(10, 2.0), (20, 3.0), (20, 5.0), (15, 4.0)]) == [(10, 2.0), (20, 3.0)]


def test_compare_cli_tiny(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: lenet300\ndata: digits\ntechniques:\n"
        "  - {type: prune_unstructured, sparsity: 0.9, end: 0.6, regularization: 1.0}\n"
        "  - {type: quant_lsq, bits: 4, start: 0.3}\n"
        "training: {epochs: 1, batch_size: 128, lr: 0.002}\ncoordination: {every: 2, log_every: 2}\n")
    out, tb = tmp_path / "cmp", tmp_path / "tb"
    args = ["compare", str(recipe), "--ratios", "20", "--seeds", "1", "--first-seed", "1", "--teacher-epochs", "1",
            "--variants", "joint-pcgrad,sequential,overlap", "--out", str(out), "--tensorboard", str(tb)]
    monkeypatch.setattr(sys, "argv", ["jointcompress", *args])  # as typed: compare.json records how to run it again
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((out / "compare.json").read_text())
    assert result["command"] == "jointcompress " + shlex.join(args)
    assert result["first_seed"] == 1 and {r["seed"] for r in result["runs"]} == {1}  # a later batch of seeds
    assert {r["variant"] for r in result["runs"]} == {"joint-pcgrad", "sequential", "overlap"}
    from jointcompress.data import load_digits

    assert result["train_images"] == len(load_digits().y_train)  # the training-set size the runs used
    for r in result["runs"]:
        manifest = json.loads((out / r["dir"] / "artifact" / "manifest.json").read_text())
        assert r["file_bytes"] == manifest["weights_file_bytes"]
        assert abs(r["file_bytes"] / r["target_bytes"] - 1) <= 0.02, r  # each variant steered onto the same size
        assert (out / r["dir"] / "history.json").is_file()
        history = json.loads((out / r["dir"] / "history.json").read_text())
        trims = [e["step"] for e in history["events"] if e.get("event") == "size_trim" and "best_before" in e]
        assert r["candidate_epochs"] == sum(1 for e in history["epochs"]
                                            if e.get("at_target") and e["step"] >= max(trims, default=-1)) >= 1
        assert r["kept_metric"] == history["best_metric"] is not None  # compare.json holds it: runs/ is not kept
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
    # compare.json and the printed table: every seed's teacher, and each variant paired with sequential
    assert result["uncompressed_summary"]["n"] == 1
    assert {(p["variant"], p["n"], p["verdict"]) for p in result["paired"]} == {("joint-pcgrad", 1, "too few seeds"),
                                                                               ("overlap", 1, "too few seeds")}
    assert "uncompressed (teacher)" in res.output and "too few seeds" in res.output
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


def _recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ntechniques:\n"
                      "  - {type: prune_unstructured, sparsity: 0.9, end: 0.6}\n"
                      "  - {type: quant_lsq, bits: 4, start: 0.3}\n"
                      "training: {epochs: 1, batch_size: 128}\n")
    return recipe


def test_bad_or_duplicate_ratios_are_refused_before_anything_trains(tmp_path):
    """10,10 ran one folder twice (n: 2 from one run); 10,10.000001 two rows in one folder; 20000 failed after the
    teacher and the 10x point trained; nan and inf passed the "> 1" check."""
    from jointcompress.errors import RecipeError

    recipe = _recipe(tmp_path)
    for ratios, words in (("10,10", ["duplicate", "r10"]), ("10,10.000001", ["duplicate", "10.000001", "r10"]),
                          ("10,20000", ["20000", "<= 10000"]), ("nan", ["nan", "finite"]), ("inf", ["inf"]),
                          ("10,1", ["> 1", "got 1"])):
        out = tmp_path / f"cmp_{len(words)}_{ratios.replace(',', '_')}"
        res = CliRunner().invoke(app, ["compare", str(recipe), "--ratios", ratios, "--variants", "sequential",
                                       "--teacher-epochs", "1", "--out", str(out)])
        assert res.exit_code != 0 and isinstance(res.exception, RecipeError), (ratios, res.output)
        message = str(res.exception)
        assert "--ratios" in message and all(w in message for w in words), (ratios, message)
        assert not out.exists()  # refused before the output folder, the data and any training


def test_a_latency_target_in_the_recipe_is_said_not_read(tmp_path):
    """compare ran its --ratios in place of a recipe's `speedup: 3` without a word; compare.json still showed it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: {speedup: 3, batch: 64}\ntechniques: [{type: prune_structured}]\n")
    with pytest.warns(UserWarning, match=r"the recipe's latency target \{'speedup': 3.0, 'batch': 64\} is not read"):
        res = CliRunner().invoke(app, ["compare", str(recipe), "--ratios", "10", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "no model given" in str(res.exception)  # stopped here, before any training


def test_the_ratio_bound_is_read_from_the_recipe_model_and_run_compare_checks_it_too(tmp_path):
    from jointcompress.compare import CompareSpec, check_variants, ratio_bounds, run_compare
    from jointcompress.data import load_digits
    from jointcompress.errors import RecipeError
    from jointcompress.recipe import Target, load_recipe

    import pydantic
    import pytest

    lower, upper = ratio_bounds()
    Target(ratio=upper)
    with pytest.raises(pydantic.ValidationError):
        Target(ratio=upper * 1.001)
    assert lower == 1.0
    with pytest.raises(RecipeError, match=r"--ratios: duplicate .*r10"):  # the API, not only the command line
        run_compare(load_recipe(_recipe(tmp_path)), load_digits(), "lenet300", CompareSpec(ratios=[10.0, 10.0000001]),
                    tmp_path / "never", log=lambda s: None)
    assert not (tmp_path / "never").exists()
    # check_variants parses every ratio's recipe, not only the first one's
    with pytest.raises(RecipeError, match="--ratios 20000"):
        check_variants(load_recipe(_recipe(tmp_path)), CompareSpec(ratios=[20.0, 20000.0], variants=("sequential",)))
    with pytest.raises(RecipeError, match="--ratios 20000"):
        check_variants(load_recipe(_recipe(tmp_path)), CompareSpec(ratios=[20.0, 20000.0], variants=("joint-paced-obdland-none",)))


def _fake_result():
    """Three seeds at 10x (joint 1, 2 and 3 points better than sequential), and a 20x point that ran one seed."""
    runs = []
    for seed, (j, s) in enumerate([(0.90, 0.89), (0.91, 0.89), (0.92, 0.89)]):
        for variant, acc in (("joint-paced-obdland-none", j), ("sequential", s)):
            runs.append({"variant": variant, "ratio_target": 10.0, "seed": seed, "accuracy": acc, "error": 1 - acc,
                         "ratio": 10.0, "file_bytes": 1000, "dir": f"runs/{variant}-r10-s{seed}"})
    for variant, acc in (("joint-paced-obdland-none", 0.80), ("sequential", 0.85)):
        runs.append({"variant": variant, "ratio_target": 20.0, "seed": 1, "accuracy": acc, "error": 1 - acc,
                     "ratio": 20.0, "file_bytes": 500, "dir": f"runs/{variant}-r20-s1"})
    return {"model": "lenet300", "data": "digits", "seeds": 3, "variants": ["joint-paced-obdland-none", "sequential"],
            "uncompressed": [{"seed": 0, "accuracy": 0.95, "bytes": 10000}, {"seed": 1, "accuracy": 0.97, "bytes": 10000},
                             {"seed": 2, "accuracy": 0.96, "bytes": 10000}], "runs": runs}


def test_paired_differences_vs_sequential_per_ratio_with_a_verdict_only_from_three_seeds():
    import pytest

    from jointcompress.compare import paired_differences, with_summary

    result = with_summary(_fake_result())
    assert result["paired"] == paired_differences(result["runs"])
    by_ratio = {p["ratio_target"]: p for p in result["paired"]}
    assert set(by_ratio) == {10.0, 20.0} and all(p["variant"] == "joint-paced-obdland-none" for p in result["paired"])
    p10, p20 = by_ratio[10.0], by_ratio[20.0]
    assert p10["n"] == 3 and p10["seeds"] == [0, 1, 2]
    assert p10["error_diff_mean"] == pytest.approx(-2.0) and p10["error_diff_se"] == pytest.approx(1 / 3 ** 0.5)
    assert p10["verdict"] == "beyond 2 SE"  # |-2| > 2 x 0.577
    assert p20["n"] == 1 and p20["error_diff_mean"] == pytest.approx(5.0) and p20["error_diff_se"] is None
    assert p20["verdict"] == "too few seeds"
    two = dict(_fake_result(), runs=[r for r in _fake_result()["runs"] if r["seed"] != 2])
    (p2,) = [p for p in paired_differences(two["runs"]) if p["ratio_target"] == 10.0]
    assert p2["n"] == 2 and p2["error_diff_se"] is not None and p2["verdict"] == "too few seeds"
    t = result["uncompressed_summary"]
    assert t["n"] == 3 and t["accuracy_mean"] == pytest.approx(0.96) and (t["accuracy_min"], t["accuracy_max"]) == (0.95, 0.97)


def test_summary_table_shows_n_per_row_the_teacher_and_the_paired_difference():
    from jointcompress.commands.compare_cmd import summary_table
    from jointcompress.compare import with_summary

    table = summary_table(with_summary(_fake_result()))
    cols = {c.header: list(c.cells) for c in table.columns}
    assert "mean over 3 seed(s)" not in str(table.title) and "n seeds that ran each row" in str(table.title)
    assert cols["variant"][0] == "uncompressed (teacher)" and cols["n"][0] == "3"
    assert cols["accuracy"][0] == "96.00% [95.00-97.00]"
    # bytes on disk beside the ratio: the teachers' fp32 file, then each row's mean weights file
    assert cols["bytes"][0] == "10,000 B" and "1,000 B" in cols["bytes"] and "500 B" in cols["bytes"]
    rows = list(zip(cols["variant"], cols["target"], cols["n"], cols["Δerror vs sequential"]))
    assert ("joint-paced-obdland-none", "10x", "3", "-2.00 ± 0.58 pts (n=3): beyond 2 SE") in rows
    assert ("joint-paced-obdland-none", "20x", "1", "+5.00 pts (n=1): too few seeds") in rows
    assert ("sequential", "20x", "1", "") in rows
    # a compare.json written before the paired fields still prints
    assert len(summary_table({**_fake_result(), "summary": with_summary(_fake_result())["summary"]}).rows) == 5


def test_pareto_plot_shows_every_seeds_teacher_as_mean_and_min_max():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pytest

    from jointcompress.compare import plot_pareto

    fig, ax = plt.subplots()
    plot_pareto(_fake_result(), None, ax=ax)
    (bar,) = [c for c in ax.containers if "uncompressed" in str(c.get_label())]
    assert "3 teacher" in bar.get_label()
    line = bar.lines[0]
    assert list(line.get_xdata()) == [1.0] and line.get_ydata()[0] == pytest.approx(4.0)  # mean error of 5, 3, 4 %
    (segments,) = [c.get_segments() for c in bar.lines[2]]
    (low, high) = sorted(p[1] for p in segments[0])
    assert (low, high) == (pytest.approx(3.0), pytest.approx(5.0))  # seed 1's and seed 0's teachers
    plt.close(fig)


def test_compare_force_clears_an_earlier_compares_points_and_report(tmp_path):
    """Rerun with --force into the same folder, the earlier compare's runs/ folders, report.html and layers.*
    stayed beside the new compare.csv, read as its own; the user's other files stay."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ntechniques: [{type: prune_unstructured, sparsity: 0.5}, "
                      "{type: quant_lsq, bits: 4}]\ntraining: {epochs: 1, batch_size: 128}\n")
    out = tmp_path / "cmp"
    for folder in ("sequential-r40-s0", "mine"):  # an earlier compare's point, and a folder of the user's
        (out / "runs" / folder).mkdir(parents=True)
    for name in ("report.html", "layers.csv", "layers.json", "notes.txt"):
        (out / name).write_text("earlier")
    args = ["compare", str(recipe), "--ratios", "8", "--seeds", "1", "--teacher-epochs", "1", "--variants", "sequential",
            "--out", str(out), "--force"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["mine", "sequential-r8-s0"]
    assert not any((out / name).exists() for name in ("report.html", "layers.csv", "layers.json"))
    assert (out / "notes.txt").read_text() == "earlier" and (out / "compare.csv").is_file()
    kept = out / "runs" / "sequential-r8-s0" / "artifact"  # its --weights inside a point --force would clear
    res = CliRunner().invoke(app, [*args, "--weights", str(kept)])
    assert res.exit_code != 0 and "--force clears sequential-r8-s0" in " ".join(str(res.exception).split())
    assert (kept / "manifest.json").is_file()


def test_compare_takes_a_recipe_whose_sparsity_its_ratios_set(tmp_path):
    """Its help says the target comes from --ratios, yet a recipe without target or sparsity was refused
    ("sparsity is required unless target sets it") before --ratios was read."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ntechniques: [{type: prune_unstructured}, {type: quant_lsq, bits: 4}]\n"
                      "training: {epochs: 1, batch_size: 128}\n")
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["compare", str(recipe), "--ratios", "8", "--seeds", "1", "--teacher-epochs", "1",
                                   "--variants", "sequential", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert [r["ratio_target"] for r in json.loads((out / "compare.json").read_text())["runs"]] == [8.0]


def test_an_interrupted_compare_resumes_with_the_points_it_finished(tmp_path, monkeypatch):
    """compare --force was the only way on after a Ctrl-C: it deleted every finished point and trained them all
    again, teachers too. --resume keeps what compare.json holds, reads the seed's teacher back, reruns the point
    the interruption stopped, and ends with the compare an uninterrupted run gives."""
    import jointcompress.compare as compare
    import jointcompress.pipeline as pipeline

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet300\ndata: digits\ntechniques: [{type: prune_unstructured}, {type: quant_lsq, bits: 4}]\n"
                      "training: {epochs: 1, batch_size: 128}\n")
    args = ["compare", str(recipe), "--ratios", "10,20", "--seeds", "1", "--teacher-epochs", "1",
            "--variants", "sequential,overlap"]
    whole = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    killed = tmp_path / "killed"  # kill -9 before its first compare.json was in place: its own temporary file only
    killed.mkdir()
    (killed / ".compare.json.x1.tmp").write_text("{")
    started = CliRunner().invoke(app, [*args[:3], "10", *args[4:], "--out", str(killed), "--resume"])
    assert started.exit_code == 0 and "is empty: the compare starts" in started.output, started.output
    assert not list(killed.glob(".*.tmp"))
    run_one, calls = compare.run_one, []

    def stopped_at_the_third(*a, **k):
        calls.append(a[4].name)
        if len(calls) == 3:
            (a[4] / "artifact").mkdir(parents=True)  # what the stopped point left
            raise KeyboardInterrupt
        return run_one(*a, **k)

    monkeypatch.setattr(compare, "run_one", stopped_at_the_third)
    out = tmp_path / "cmp"
    first = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert first.exit_code != 0 and len(json.loads((out / "compare.json").read_text())["runs"]) == 2
    assert (out / "teachers" / "s0.safetensors").is_file()
    calls.clear()
    monkeypatch.setattr(pipeline, "train_teacher", lambda *a, **k: pytest.fail("the seed's teacher trained again"))
    changed = CliRunner().invoke(app, [*args, "--out", str(out), "--resume", "--epochs", "2"])
    said = str(changed.exception)
    assert changed.exit_code != 0 and "ran with other settings (epochs: 1 then, 2 now; recipe.training.epochs: 1 then" in said
    fewer = CliRunner().invoke(app, [*args[:3], "20", *args[4:], "--out", str(out), "--resume"])
    assert fewer.exit_code != 0 and "ran --ratios 10,20 on seeds 0..0; give at least those" in str(fewer.exception)
    both = CliRunner().invoke(app, [*args, "--out", str(out), "--resume", "--force"])
    assert both.exit_code != 0 and "give one" in str(both.exception)
    other = tmp_path / "other"
    (other / "runs" / "sequential-r10-s0").mkdir(parents=True)  # no compare.json: not a compare's folder
    refused = CliRunner().invoke(app, [*args, "--out", str(other), "--resume"])
    assert refused.exit_code != 0 and "holds no compare.json" in str(refused.exception)
    (out / "teachers" / ".s0.safetensors.x2.tmp").write_bytes(b"\0" * 64)  # a teacher's write a kill -9 stopped
    (out / ".compare.csv.x3.tmp").write_text("variant")
    written = json.loads((out / "compare.json").read_text())  # as a compare from before the recipe's `inputs` wrote it
    del written["recipe"]["inputs"]
    (out / "compare.json").write_text(json.dumps(written))
    resumed = CliRunner().invoke(app, [*args, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert not list(out.glob(".*.tmp")) and not list((out / "teachers").glob(".*.tmp"))  # --resume kept them for good
    assert calls == ["sequential-r20-s0", "overlap-r20-s0"]  # the stopped point and the one after it, no other
    points = lambda folder: {(r["variant"], r["ratio_target"]): (r["accuracy"], r["file_bytes"])  # noqa: E731
                             for r in json.loads((folder / "compare.json").read_text())["runs"]}
    assert points(out) == points(tmp_path / "whole") and len(points(out)) == 4
    assert len(json.loads((out / "compare.json").read_text())["uncompressed"]) == 1
    calls.clear()  # a resume with another ratio adds its points, with the seed's kept teacher
    more = CliRunner().invoke(app, [*args[:3], "10,20,30", *args[4:], "--out", str(out), "--resume"])
    assert more.exit_code == 0 and calls == ["sequential-r30-s0", "overlap-r30-s0"], more.output
    assert len(points(out)) == 6 and json.loads((out / "compare.json").read_text())["ratios"] == [10.0, 20.0, 30.0]


def test_one_seeds_larger_file_and_a_difference_without_spread_are_not_called():
    """The mean of per-seed file ratios (1.047) hid one seed's file 14% larger, and three seeds that each differ by
    the same one test image (standard error 0) were called "beyond 2 SE"."""
    from jointcompress.compare import paired_differences, unequal_files_note

    runs = []
    for seed, (joint_file, joint_acc) in enumerate(((1000, 0.900), (1140, 0.900), (1000, 0.900))):
        runs += [{"variant": "joint-none", "ratio_target": 10.0, "seed": seed, "accuracy": joint_acc,
                  "error": 1 - joint_acc, "file_bytes": joint_file},
                 {"variant": "sequential", "ratio_target": 10.0, "seed": seed, "accuracy": 0.902, "error": 0.098,
                  "file_bytes": 1000}]
    (paired,) = paired_differences(runs)
    assert paired["error_diff_se"] == 0 and paired["verdict"].startswith("no spread"), paired
    assert paired["file_bytes_ratio_range"] == [1.0, 1.14]
    assert unequal_files_note(paired) == "its files 1.00x to 1.14x sequential's (by seed): not the same size"


def test_a_side_nearer_chance_than_its_teachers_is_said_beside_the_verdict():
    """At 100x a sequential baseline trained into collapse (13-22% on 10 classes, teachers near 90%) was read as
    "joint better, beyond 2 SE" with no word that the gap measured a failed run; a side that holds is not marked,
    and a result that does not record its classes (written before) is read as before."""
    from jointcompress.commands.compare_cmd import paired_cell
    from jointcompress.compare import with_summary

    runs = []
    for seed, (joint, seq) in enumerate(((0.62, 0.134), (0.60, 0.136), (0.55, 0.225))):
        runs += [{"variant": v, "ratio_target": 100.0, "seed": seed, "accuracy": a, "error": 1 - a, "ratio": 100.0,
                  "file_bytes": 1000} for v, a in (("joint-none", joint), ("sequential", seq))]
    result = {"classes": 10, "runs": runs, "uncompressed": [{"seed": s, "accuracy": a, "bytes": 9000}
                                                            for s, a in enumerate((0.891, 0.899, 0.917))]}
    (paired,) = with_summary(result)["paired"]
    assert [c["variant"] for c in paired["collapsed"]] == ["sequential"]  # joint's 59% is nearer its teachers
    assert paired["collapsed"][0]["accuracy"] == pytest.approx(0.165)
    cell = paired_cell(paired)
    assert "beyond 2 SE; collapsed: sequential 16.5%, nearer chance (10.0%) than the teachers (90.2%)" in cell, cell
    for r in runs:
        if r["variant"] == "sequential":
            r["accuracy"], r["error"] = 0.6, 0.4  # 60% with teachers at 90% and chance 10%: nearer its teachers
    assert "collapsed" not in with_summary(result)["paired"][0]
    del result["classes"]
    for r in runs:
        if r["variant"] == "sequential":
            r["accuracy"], r["error"] = 0.134, 0.866
    assert "collapsed" not in with_summary(result)["paired"][0]


def test_paired_files_of_other_sizes_are_said_beside_the_verdict():
    """At a target both undershoot (one 4-bit alone beats), joint and sequential landed at their own sizes and the
    table compared their errors as if the files were one size."""
    from jointcompress.commands.compare_cmd import paired_cell
    from jointcompress.compare import paired_differences

    runs = _fake_result()["runs"]
    (same,) = [p for p in paired_differences(runs) if p["ratio_target"] == 10.0]
    assert same["file_bytes_ratio"] == 1.0 and "not the same size" not in paired_cell(same)
    for r in runs:
        if r["variant"] == "sequential" and r["ratio_target"] == 10.0:
            r["file_bytes"] = 1600
    (unequal,) = [p for p in paired_differences(runs) if p["ratio_target"] == 10.0]
    assert unequal["file_bytes_ratio"] == 0.625
    assert paired_cell(unequal).endswith("beyond 2 SE; its files 0.62x sequential's (by seed): not the same size")
    from rich.console import Console

    from jointcompress.commands.compare_cmd import summary_table

    summary = [{"variant": v, "ratio_target": 8.0, "n": 1, "ratio_mean": 8.0, "accuracy_mean": 0.9, "accuracy_min": 0.9,
                "accuracy_max": 0.9, "error_mean": 0.1, "changed_nothing": v.endswith("scale")}
               for v in ("joint-paced-obdland-scale", "joint-paced-obdland-pcgrad")]
    console = Console(record=True, width=400)
    console.print(summary_table({"model": "m", "data": "d", "summary": summary, "paired": [], "uncompressed": []}))
    lines = console.export_text().splitlines()
    assert any("scale (changed no update: trained as strategy none)" in line for line in lines)
    assert not any("pcgrad (changed no update" in line for line in lines)


def test_the_epochs_a_run_chose_its_state_among_are_counted_after_the_trim():
    """Chosen on the test split, a variant with more at-target epochs reads it more often; sequential's late trim
    forgets the states before it. compare.json did not say how many each run chose among."""
    from types import SimpleNamespace

    from jointcompress.compare import candidate_epochs

    epochs = [{"step": s, "at_target": s >= 20} for s in (10, 20, 30, 40, 50)]
    assert candidate_epochs(SimpleNamespace(epochs=epochs, events=[])) == 4
    trimmed = [{"event": "size_trim", "step": 45, "best_before": 0.9}]
    assert candidate_epochs(SimpleNamespace(epochs=epochs, events=trimmed)) == 1
    assert candidate_epochs(SimpleNamespace(epochs=epochs, events=[{"event": "size_trim", "ratio": 1.0}])) == 4  # a landing


def test_sequential_sens_trains_the_budgets_its_teachers_scan_allocates_and_is_a_second_baseline(tmp_path):
    """The sensitivity-allocated baseline: each seed's teacher scanned (kept beside it), its budgets the allocator's
    from that scan (not the ERK proxy sequential gets), and every joint variant paired with it as well."""
    from jointcompress.data import load_digits
    from jointcompress.pipeline import builder_for, load_weights
    from jointcompress.recipe import parse_recipe
    from jointcompress.targets import resolve_target

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: lenet300\ndata: digits\ntechniques:\n"
        "  - {type: prune_unstructured, sparsity: 0.9, end: 0.6}\n"
        "  - {type: quant_lsq, bits: 4, start: 0.3}\n"
        "training: {epochs: 1, batch_size: 128, lr: 0.002}\n")
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["compare", str(recipe), "--ratios", "20", "--seeds", "1", "--teacher-epochs", "1",
                                   "--variants", "joint-paced-obdland-none,sequential,sequential-sens", "--out", str(out)])
    assert res.exit_code == 0, res.output
    scanned = json.loads((out / "teachers" / "s0.sensitivity.json").read_text())
    assert set(scanned["layers"]) == {"fc1", "fc2", "fc3"} and scanned["measured_on"] == "test"
    split = load_digits()
    teacher = load_weights(builder_for("lenet300", split, check=False)(), out / "teachers" / "s0.safetensors")
    result = json.loads((out / "compare.json").read_text())
    targeted = parse_recipe({**result["recipe"], "target": {"ratio": 20}})
    expected = resolve_target(teacher, targeted, split.x_train[:2], sensitivity=scanned)
    erk = resolve_target(teacher, targeted, split.x_train[:2])
    manifests = {r["variant"]: json.loads((out / r["dir"] / "artifact" / "manifest.json").read_text()) for r in result["runs"]}
    trained = manifests["sequential-sens"]["recipe"]["techniques"]
    assert trained[1]["layer_bits"] == expected.technique("quant_lsq").layer_bits
    assert trained[0]["layer_sparsity"] == pytest.approx(expected.technique("prune_unstructured").layer_sparsity)
    assert trained[0]["layer_sparsity"] != pytest.approx(erk.technique("prune_unstructured").layer_sparsity)  # not ERK's
    assert manifests["sequential-sens"]["recipe"]["target"]["allocator"] == "sensitivity"  # what it trained on
    pairs = {(p["variant"], p["baseline"]) for p in result["paired"]}
    assert pairs == {("joint-paced-obdland-none", "sequential"), ("sequential-sens", "sequential"),
                     ("joint-paced-obdland-none", "sequential-sens")}
    from jointcompress.commands.compare_cmd import summary_table

    assert [c.header for c in summary_table(result).columns][-2:] == ["Δerror vs sequential", "Δerror vs sequential-sens"]


def _forget_module(path) -> None:
    """The builder file imported again, as a new process would (this one keeps the first import)."""
    import sys

    from jointcompress.models import load_builder

    load_builder.cache_clear()
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == Path(path).resolve():
            del sys.modules[name]


def test_a_resume_after_the_builder_changed_the_architecture_is_refused(tmp_path, monkeypatch):
    """Only the builder's name was recorded: a --resume after its widths changed (128/64 to 32/64) pooled seeds of
    two models into one verdict. A compare.json written before the architecture was recorded still resumes."""
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine.py"
    build = "import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, {}), nn.ReLU(), nn.Linear({}, 10))\n"
    mine.write_text(build.format(32, 32))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\ntechniques: [{type: prune_unstructured}, {type: quant_lsq, bits: 4}]\n"
                      "training: {epochs: 1, batch_size: 128}\n")
    args = ["compare", str(recipe), "--model", "mine.py:build", "--ratios", "10", "--teacher-epochs", "1",
            "--variants", "sequential", "--out", str(tmp_path / "cmp")]
    assert CliRunner().invoke(app, [*args, "--seeds", "1"]).exit_code == 0
    mine.write_text(build.format(16, 16))
    _forget_module(mine)
    changed = CliRunner().invoke(app, [*args, "--seeds", "2", "--resume"])
    assert changed.exit_code != 0 and "inputs_sha256.architecture" in str(changed.exception), changed.output
    mine.write_text(build.format(32, 32))
    _forget_module(mine)
    path = tmp_path / "cmp" / "compare.json"
    older = json.loads(path.read_text())
    del older["inputs_sha256"]["architecture"]  # as an earlier version wrote it
    path.write_text(json.dumps(older))
    assert CliRunner().invoke(app, [*args, "--seeds", "2", "--resume"]).exit_code == 0


def test_a_variant_given_twice_is_refused_and_a_compare_without_sequential_is_said(tmp_path):
    """--variants joint-none,joint-none ran it once without a word (a duplicate ratio is refused); without
    sequential every paired column stayed empty, unsaid."""
    from jointcompress.compare import CompareSpec, _compare_base
    from jointcompress.errors import RecipeError
    from jointcompress.recipe import load_recipe

    recipe = load_recipe(_recipe(tmp_path))
    with pytest.raises(RecipeError, match=r"--variants: joint-none given twice"):
        _compare_base(recipe, "lenet300", CompareSpec(ratios=[20.0], variants=("joint-none", "joint-none")))
    with pytest.warns(UserWarning, match=r"--variants holds no sequential: the paired differences"):
        _compare_base(recipe, "lenet300", CompareSpec(ratios=[20.0], variants=("joint-none",)))

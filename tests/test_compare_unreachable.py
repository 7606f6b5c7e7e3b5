"""compare records a ratio it cannot reach, with the reason, and runs the others."""
import json

from typer.testing import CliRunner

from jointcompress.cli import app


def _compare(tmp_path, recipe_text: str, ratios: str, seeds: int, variants: str):
    """`jointcompress compare` on `recipe_text` with one-epoch teachers, into tmp_path/cmp: (the CLI result,
    the folder)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["compare", str(recipe), "--ratios", ratios, "--seeds", str(seeds),
                                   "--teacher-epochs", "1", "--variants", variants, "--out", str(out)])
    return res, out


def test_unreachable_ratio_is_recorded_and_the_run_goes_on(tmp_path):
    res, out = _compare(tmp_path, "model: lenet300\ndata: digits\ntechniques:\n"
                        "  - {type: prune_unstructured, sparsity: 0.9, end: 0.6}\n"
                        "  - {type: quant_lsq, bits: 4, start: 0.3}\n"
                        "training: {epochs: 1, batch_size: 128, lr: 0.002}\ncoordination: {every: 2, log_every: 2}\n",
                        "5000,20", 1, "sequential")
    assert res.exit_code == 0, res.output
    result = json.loads((out / "compare.json").read_text())
    assert [r["ratio_target"] for r in result["runs"]] == [20]
    (u,) = result["unreachable"]
    assert u["ratio_target"] == 5000 and u["seed"] == 0 and "cannot be planned" in u["reason"]  # the allocator's floor
    assert "keeps" in u["reason"] and "B" in u["reason"]  # the floors, in bytes
    assert "not run, target unreachable" in res.output
    import csv

    rows = list(csv.DictReader((out / "compare.csv").open()))  # the CSV alone says the point was asked for
    assert [(r["ratio_target"], r["unreachable"] == "") for r in rows] == [("20.0", True), ("5000.0", False)]
    assert rows[1]["variant"] == "all" and "cannot be planned" in rows[1]["unreachable"]


def test_a_recipe_the_sequential_variant_cannot_train_is_refused_before_any_training(tmp_path):
    """A joint-form recipe (size_budget) stopped at its first sequential point after the joint variants had
    trained; one with prune_structured recorded every point as out of reach and exited 0."""
    from jointcompress.compare import CompareSpec, check_variants
    from jointcompress.errors import RecipeError
    from jointcompress.recipe import builtin_recipe, load_recipe

    import pytest

    for name, words in (("lenet300_mnist_joint", "size_budget"), ("lenet5_mnist", "prune_structured beside a size target")):
        with pytest.raises(RecipeError, match=f"(?s)compare variant sequential: .*{words}.*--variants joint-paced"):
            check_variants(load_recipe(builtin_recipe(name)), CompareSpec(ratios=[20]))
        check_variants(load_recipe(builtin_recipe(name)), CompareSpec(ratios=[20], variants=("joint-paced-obdland-none",)))


def test_prune_structured_is_compared_in_the_joint_form_and_a_compare_that_runs_nothing_fails(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: lenet5\ndata: digits\nmode: joint\ntechniques:\n"
        "  - {type: prune_structured, sparsity: 0.25, criterion: magnitude, end: 0.4}\n"
        "  - {type: prune_unstructured, sparsity: 0.5, end: 0.6}\n"
        "  - {type: quant_lsq, bits: 4}\n"
        "training: {epochs: 1, batch_size: 128, lr: 0.002}\n")
    out = tmp_path / "cmp"
    args = ["compare", str(recipe), "--seeds", "1", "--teacher-epochs", "1", "--variants", "joint-paced-obdland-none"]
    res = CliRunner().invoke(app, [*args, "--ratios", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    (run,) = json.loads((out / "compare.json").read_text())["runs"]
    assert run["ratio_target"] == 8 and run["file_bytes"] <= run["target_bytes"] * 1.02
    res = CliRunner().invoke(app, [*args, "--ratios", "5000", "--out", str(tmp_path / "none")])
    assert res.exit_code != 0 and "compare ran nothing" in str(res.exception)
    assert json.loads((tmp_path / "none" / "compare.json").read_text())["unreachable"]  # the reasons are kept
    res = CliRunner().invoke(app, [*args, "--ratios", "8", "--out", str(out)])
    message = str(res.exception)
    assert res.exit_code != 0 and "--force" in message and "--resume" not in message  # compare has no --resume


def test_a_ratio_the_allocator_cannot_plan_is_refused_before_any_teacher_trains(tmp_path, monkeypatch):
    """A small MobileNet at 20x trained its teacher for 11 minutes before compare said that its BatchNorm
    tensors alone nearly filled the file: the floor is the architecture's, known before training."""
    import pytest

    import jointcompress.compare as compare

    monkeypatch.setattr(compare, "_seed_teacher", lambda *a, **k: pytest.fail("a teacher trained for a point out of reach"))
    res, out = _compare(tmp_path, "model: lenet300\ndata: digits\ntechniques:\n"
                        "  - {type: prune_unstructured, sparsity: 0.9}\n  - {type: quant_lsq, bits: 4}\n"
                        "training: {epochs: 1, batch_size: 128}\n",
                        "5000,8000", 2, "joint-paced-obdland-none,sequential")
    assert res.exit_code != 0 and "compare ran nothing" in str(res.exception), res.output
    unreachable = json.loads((out / "compare.json").read_text())["unreachable"]
    assert [(u["ratio_target"], u["seed"]) for u in unreachable] == [(5000, 0), (5000, 1), (8000, 0), (8000, 1)]
    assert all("cannot be planned" in u["reason"] for u in unreachable)


def test_a_ratio_out_of_reach_of_joint_variants_alone_is_refused_before_any_teacher_trains(tmp_path, monkeypatch):
    """With joint variants only (no allocator budgets to plan), compare trained every seed's teacher before each run
    refused the target as it set up; compress refuses the same target on the untrained model in seconds."""
    import pytest

    import jointcompress.compare as compare

    monkeypatch.setattr(compare, "_seed_teacher", lambda *a, **k: pytest.fail("a teacher trained for a point out of reach"))
    res, out = _compare(tmp_path, "model: lenet300\ndata: digits\nmode: joint\ntechniques:\n"
                        "  - {type: prune_unstructured}\n  - {type: quant_lsq, bits: 4}\n"
                        "training: {epochs: 1, batch_size: 128}\n",
                        "5000", 2, "joint-paced-obdland-none")
    assert res.exit_code != 0 and "compare ran nothing" in str(res.exception), res.output
    unreachable = json.loads((out / "compare.json").read_text())["unreachable"]
    assert [(u["ratio_target"], u["seed"]) for u in unreachable] == [(5000, 0), (5000, 1)]
    assert all("cannot be reached" in u["reason"] for u in unreachable)


def test_a_compare_refused_after_it_made_its_out_folder_leaves_none(tmp_path):
    """An unknown --variants name is found once --out exists (run_compare checks the spec): the refused
    command left an empty folder where the user then looked for results."""
    from jointcompress.recipe import builtin_recipe

    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["compare", str(builtin_recipe("demo")), "--variants", "bogus", "--out", str(out)])
    assert res.exit_code != 0 and "unknown" in str(res.exception) + res.output and not out.exists()


def test_a_damaged_teacher_the_compare_wrote_itself_is_named_with_the_way_to_train_it_again(tmp_path):
    """A truncated OUT/teachers/s2.safetensors ended the resume with "give a .safetensors file or a state dict saved
    with torch.save": a file the user never gave; deleting it is what works."""
    import pytest

    from jointcompress.compare import TEACHERS, CompareSpec, _seed_teacher
    from jointcompress.data import load_digits
    from jointcompress.errors import JointCompressError
    from jointcompress.recipe import parse_recipe

    (tmp_path / TEACHERS).mkdir()
    (tmp_path / TEACHERS / "s2.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(JointCompressError, match=r"this compare trained and wrote .*s2.safetensors for seed 2: delete it, "
                                                 r"and --resume trains that teacher again"):
        _seed_teacher("lenet300", load_digits(), CompareSpec(ratios=[10]), parse_recipe({}), 2, None, None, tmp_path)


def test_a_point_only_the_sensitivity_allocation_cannot_plan_is_recorded_for_that_variant_alone(tmp_path, monkeypatch):
    from jointcompress import compare
    from jointcompress.targets import TargetError

    monkeypatch.setattr(compare, "_scanned_budgets", lambda *a: TargetError("the scan's budgets do not fit"))
    res, out = _compare(tmp_path, "model: lenet300\ndata: digits\ntechniques:\n"
                        "  - {type: quant_lsq, bits: 4, start: 0.3}\n"
                        "training: {epochs: 1, batch_size: 256, lr: 0.002}\n",
                        "20", 1, "sequential,sequential-sens")
    assert res.exit_code == 0, res.output
    result = json.loads((out / "compare.json").read_text())
    assert [r["variant"] for r in result["runs"]] == ["sequential"]  # the ERK baseline still ran
    (missing,) = result["unreachable"]
    assert missing["variant"] == "sequential-sens" and "do not fit" in missing["reason"]

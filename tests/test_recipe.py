import warnings

import pytest

from jointcompress import RecipeError, load_recipe, parse_recipe
from jointcompress.recipe import builtin_recipe


def test_builtin_recipes_validate():
    for name in ("demo", "lenet300_mnist", "lenet5_mnist"):
        r = load_recipe(builtin_recipe(name))
        assert r.techniques


@pytest.mark.parametrize(
    "bad, field, words",
    [
        ({"techniques": [{"type": "prune_unstructured", "sparsity": 1.5}]}, "techniques.0.prune_unstructured.sparsity", "less than or equal to 0.999"),
        ({"techniques": [{"type": "quant_lsq", "bits": 1}]}, "techniques.0.quant_lsq.bits", "greater than or equal to 2"),
        ({"techniques": [{"type": "quant_lsq", "bitz": 4}]}, "techniques.0.quant_lsq.bitz", "unknown key"),
        ({"techniques": [{"type": "prune_everything"}]}, "techniques.0", "prune_unstructured"),
        ({"training": {"epochs": "ten"}}, "training.epochs", "valid integer"),
        ({"mode": "parallel"}, "mode", "'joint', 'overlap' or 'sequential'"),
        ({"coordination": {"strategy": "magic"}}, "coordination.strategy", "pcgrad"),
        ({"sequential": {"prune": 0.9}}, "sequential", "sum to 1"),
        ({"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "start": 0.8, "end": 0.2}]}, "techniques.0.prune_unstructured", "end"),
        ({"techniques": [{"type": "quant_lsq"}, {"type": "quant_lsq"}]}, "(top level)", "appears 2 times"),
        ({"techniques": [{"type": "prune_layers", "sparsity": 0.5, "per_layer": True}]}, "techniques.0.prune_layers", "per_layer does not apply"),
        ({"hf": {"ptq_bits": 1}}, "hf.ptq_bits", "greater than or equal to 2"),
        ({"techniques": [{"type": "distill_kd", "features": [{"student": "a", "teacher": "b", "loss": "l1"}]}]},
         "techniques.0.distill_kd.features.0.loss", "'mse' or 'cosine'"),
        ({"target": {"speedup": float("nan")}}, "target.speedup", "finite number"),
        ({"target": {"ratio": float("inf")}}, "target.ratio", "finite number"),
        ({"techniques": [{"type": "distill_kd", "temperature": float("nan")}]}, "techniques.0.distill_kd.temperature",
         "finite number"),
    ],
)
def test_invalid_recipe_names_the_field(bad, field, words):
    with pytest.raises(RecipeError) as err:
        parse_recipe(bad)
    msg = str(err.value)
    assert field in msg and words in msg, msg


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("techniques: [ {type: quant_lsq, bits: 9} ]\n")
    with pytest.raises(RecipeError, match=str(p)):
        load_recipe(p)
    p.write_text("techniques: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize("target, technique, needed", [
    (None, "prune_unstructured", "size_kb"), ({"speedup": 2}, "prune_unstructured", "size_kb"),
    (None, "prune_structured", "latency_ms"), ({"ratio": 20}, "prune_structured", "latency_ms")])
def test_sparsity_is_left_out_only_where_a_target_sets_it(target, technique, needed):
    recipe = {"techniques": [{"type": technique}, {"type": "quant_lsq"}]}
    if target:
        recipe["target"] = target
    with pytest.raises(RecipeError, match=rf"techniques.0 \({technique}\): sparsity is required .*target: \{{{needed}"):
        parse_recipe(recipe)
    recipe["techniques"][0]["layer_sparsity"] = {"0": 0.5}  # per layer alone: the rest's sparsity is still asked for
    with pytest.raises(RecipeError, match=r"sparsity is the rest's: 0 prunes only those"):
        parse_recipe(recipe)
    recipe["techniques"][0]["sparsity"] = 0.0
    if target is None:
        assert parse_recipe(recipe).techniques[0].layer_sparsity == {"0": 0.5}


def test_a_target_sets_the_sparsity_a_recipe_leaves_out():
    import torch
    import torch.nn as nn

    from jointcompress import compress

    torch.manual_seed(0)
    x = torch.randn(128, 20)
    y = x[:, :4].argmax(1)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    recipe = {"mode": "overlap", "target": {"ratio": 20}, "training": {"epochs": 1, "batch_size": 32},
              "techniques": [{"type": "prune_unstructured"}, {"type": "quant_lsq", "bits": 4}]}
    result = compress(model, recipe, (x, y), lambda m: 0.0)
    allocated = result.recipe.technique("prune_unstructured").sparsity
    assert 0.5 < allocated < 1 and result.techniques[0].achieved_sparsity() == pytest.approx(allocated, abs=0.01)


def test_a_json_recipe_is_read_and_its_errors_are_said_in_json_terms(tmp_path):
    """A .json recipe missing its closing brace was called "not valid YAML" with PyYAML's flow-mapping words."""
    good = tmp_path / "r.json"
    good.write_text('{"techniques": [{"type": "quant_lsq", "bits": 3}]}')
    assert load_recipe(good).technique("quant_lsq").bits == 3
    cut = tmp_path / "cut.json"
    cut.write_text('{"techniques": [{"type": "quant_lsq", "bits": 3}]\n')
    with pytest.raises(RecipeError, match=r"cut.json: not valid JSON: Expecting ',' delimiter: line 2"):
        load_recipe(cut)
    twice = tmp_path / "twice.json"
    twice.write_text('{"techniques": [], "techniques": [{"type": "quant_lsq"}]}')
    with pytest.raises(RecipeError, match=r"twice.json: not valid JSON: the key 'techniques' is given twice"):
        load_recipe(twice)


def test_a_key_given_twice_and_a_binary_file_are_refused_by_name(tmp_path):
    """Two `training:` blocks: the second replaced the first and its lr and batch_size vanished without a word;
    a data file given as the recipe was called bad YAML with a hint about tabs."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("training: {lr: 0.003, batch_size: 32}\ntechniques: [{type: quant_lsq}]\ntraining: {epochs: 3}\n")
    with pytest.raises(RecipeError, match=r"twice.yaml: not valid YAML: the key 'training' is given twice"):
        load_recipe(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text("training: {epochs: 3, epochs: 4}\n")
    with pytest.raises(RecipeError, match=r"the key 'epochs' is given twice"):
        load_recipe(nested)
    binary = tmp_path / "data.yaml"
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00\x01")
    with pytest.raises(RecipeError, match=r"data.yaml: not a text file"):
        load_recipe(binary)
    assert load_recipe(builtin_recipe("lenet300_mnist_joint")).techniques
    merged = tmp_path / "merged.yaml"  # a merge key's keys are no second ones: the mapping's own override them
    merged.write_text("techniques:\n  - &ramp {type: prune_unstructured, sparsity: 0.5, start: 0.1, end: 0.4}\n"
                      "  - {<<: *ramp, type: prune_structured, sparsity: 0.25}\n")
    ramped = load_recipe(merged).techniques[1]
    assert ramped.type == "prune_structured" and (ramped.sparsity, ramped.start, ramped.end) == (0.25, 0.1, 0.4)


def test_act_bits_without_activations_is_said():
    """quant_lsq.act_bits: 4 without activations: true ran with fp32 inputs, without a word."""
    with pytest.warns(UserWarning, match=r"act_bits: 4 does nothing without activations: true"):
        parse_recipe({"techniques": [{"type": "quant_lsq", "act_bits": 4}]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_recipe({"techniques": [{"type": "quant_lsq", "act_bits": 4, "activations": True}]})


@pytest.mark.parametrize("data, words", [
    ({"training": {"epochs": True}}, r"training: epochs: true is a yes/no, not a number"),
    ({"techniques": [{"type": "quant_lsq", "bits": False}]}, r"quant_lsq: bits: false is a yes/no"),
    ({"target": {"ratio": True}}, r"target: ratio: true is a yes/no"),
    # inside a dict or list field: `layer_sparsity: {fc2: no}` ran at 0.0, `student_layers: [no, yes]` as [0, 1]
    ({"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "layer_sparsity": {"fc2": False}}]},
     r"layer_sparsity\['fc2'\]: false is a yes/no"),
    ({"hf": {"student_layers": [False, True]}, "techniques": [{"type": "distill_kd"}]},
     r"student_layers\[0\]: false is a yes/no"),
    ({"techniques": [{"type": "quant_lsq", "layer_bits": {"fc1": True}}]}, r"layer_bits\['fc1'\]: true is a yes/no"),
])
def test_a_yes_no_given_for_a_number_is_refused(data, words):
    """YAML's `epochs: true` became 1 (pydantic reads a bool as an int) and the run trained one epoch unsaid."""
    with pytest.raises(RecipeError, match=words):
        parse_recipe(data)
    compiled = parse_recipe({"techniques": [{"type": "quant_lsq", "compile": True}]})  # a field that takes a bool
    assert compiled.technique("quant_lsq").compile is True


def test_a_utf16_file_and_two_models_are_refused_by_name(tmp_path):
    """A recipe saved as UTF-16 (PowerShell's `>`) was called "not a text file"; `model:` beside `hf:` ran the
    Hugging Face path and ignored `model:` unsaid."""
    wide = tmp_path / "wide.yaml"
    wide.write_bytes("training:\n  epochs: 2\n".encode("utf-16"))
    with pytest.raises(RecipeError, match=r"wide.yaml: is saved as UTF-16; save it as UTF-8"):
        load_recipe(wide)
    with pytest.raises(RecipeError, match=r"model: 'lenet5' names a reference model .* give one"):
        parse_recipe({"model": "lenet5", "hf": {"model_name_or_path": "my-model"}})
    # model: hf:FOLDER beside an hf: section (for max_length or student_layers): both name the Hugging Face model
    with pytest.raises(RecipeError, match=r"model: 'hf:tiny/bert' and the hf: section both name the Hugging Face "
                                          r"model; put 'tiny/bert' in hf.model_name_or_path"):
        parse_recipe({"model": "hf:tiny/bert", "hf": {"max_length": 32}})
    assert parse_recipe({"hf": {"model_name_or_path": "my-model"}}).model is None


def test_learned_widths_without_a_size_budget_are_said():
    """zero_level with learn_bits (its default) and no size_budget: nothing priced the bits, every layer stayed at
    quant_lsq.bits, without a word."""
    with pytest.warns(UserWarning, match=r"learn_bits: widths are learned against size_budget's bytes; .* stays at bits \(4\)"):
        parse_recipe({"techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True}]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_recipe({"techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True, "learn_bits": False}]})
        parse_recipe({"techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True},
                                     {"type": "size_budget", "target_bytes": 1000}], "mode": "joint"})


def test_a_quoted_version_is_read_and_a_repeated_technique_is_named_by_its_entries():
    """`version: "1"` was refused where every other number given as text is taken; a technique given twice was
    named without the entries that hold it."""
    assert parse_recipe({"version": "1", "techniques": [{"type": "distill_kd"}]}).version == 1
    with pytest.raises(RecipeError, match=r"version: Input should be 1"):
        parse_recipe({"version": "2", "techniques": [{"type": "distill_kd"}]})
    with pytest.raises(RecipeError, match=r"'quant_lsq' appears 2 times \(techniques.0, techniques.2\)"):
        parse_recipe({"techniques": [{"type": "quant_lsq"}, {"type": "distill_kd"}, {"type": "quant_lsq"}]})


def test_a_block_of_yaml_anchors_goes_under_an_x_key():
    """A top-level block holding YAML anchors (`common: &win {...}`) was an unknown key with no way around it."""
    import yaml

    text = ("x-window: &win {start: 0.1, end: 0.5}\n"
            "techniques:\n  - {type: prune_unstructured, sparsity: 0.5, <<: *win}\n")
    recipe = parse_recipe(yaml.safe_load(text))
    assert (recipe.techniques[0].start, recipe.techniques[0].end) == (0.1, 0.5)
    with pytest.raises(RecipeError, match=r"common: unknown key; .*under a top-level key starting with x-"):
        parse_recipe(yaml.safe_load(text.replace("x-window", "common")))

"""mode: joint under a size target trains the joint form (joint_form.py): zero as a quantizer level under
one size budget, not magnitude masks beside LSQ under the allocator's budgets (that is mode: overlap)."""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn as nn

from jointcompress import compress, finalize
from jointcompress.artifact import load, save
from jointcompress.compare import JOINT_OPTIONS
from jointcompress.errors import RecipeError
from jointcompress.joint_form import JOINT_FORM_VARIANT, as_joint_form
from jointcompress.recipe import parse_recipe
from jointcompress.artifact.size import dense_fp32_bytes
from jointcompress.artifact.store import load_with_spec

TECHNIQUES = [{"type": "prune_unstructured", "scope": "global", "end": 0.5},
              {"type": "quant_lsq", "bits": 4, "start": 0.3}]


def _data():
    torch.manual_seed(0)
    x = torch.randn(512, 32)
    return x, x[:, :4].argmax(1)


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 4))


def test_joint_mode_under_a_size_target_trains_zero_as_a_level_under_one_budget_and_lands_on_it(tmp_path):
    x, y = _data()
    model = _model()
    goal = dense_fp32_bytes(model) / 20
    recipe = {"mode": "joint", "target": {"ratio": 20}, "techniques": TECHNIQUES,
              "training": {"epochs": 6, "batch_size": 32, "lr": 0.003}}
    result = compress(model, recipe, (x, y), lambda m: 0.0)
    ran = result.recipe
    assert [t.type for t in ran.techniques] == ["quant_lsq", "size_budget"]
    assert ran.technique("quant_lsq").zero_level and ran.technique("quant_lsq").bits == 4
    budget = ran.technique("size_budget")
    chosen = JOINT_OPTIONS[JOINT_FORM_VARIANT]
    assert {k: getattr(budget, k) for k in chosen} == chosen and budget.saliency_mode == "landing"
    assert budget.target_bytes == pytest.approx(goal)
    event = next(e for e in result.history.events if e["event"] == "joint_form")
    assert event["replaced"] == ["prune_unstructured"] and event["size_budget"]["saliency_mode"] == "landing"
    spec = finalize(model, result.example_inputs)
    manifest = save(model, spec, tmp_path / "a", example_inputs=result.example_inputs)
    on_disk = (tmp_path / "a" / "weights.jcw").stat().st_size
    assert on_disk <= goal * 1.02, (on_disk, goal)  # the budget, not an allocation before training, set the bytes
    assert on_disk >= goal * 0.9
    steps = {name: layer["parts"]["scale"]["format"] for name, layer in manifest["layers"].items()
             if "scale" in layer["parts"]}
    assert sorted(steps) == ["0", "2", "4"] and set(steps.values()) == {"log8"}  # scale_format auto under a target


def test_a_users_own_loop_trains_the_joint_form_from_the_same_recipe_and_lands_on_the_target(tmp_path):
    """prepare() (a plain loop, the transformers Trainer) takes the recipe compress() takes: the size
    budget lives in the session, so the target needs no allocation before the loop and no steering in it."""
    import jointcompress

    x, y = _data()
    model = _model()
    goal = dense_fp32_bytes(model) / 20
    recipe = {"mode": "joint", "target": {"ratio": 20}, "techniques": TECHNIQUES, "training": {"epochs": 6}}
    session = jointcompress.prepare(model, recipe, total_steps=96)
    assert session.recipe.technique("size_budget").target_bytes == pytest.approx(goal)
    assert session.recipe.technique("prune_unstructured") is None and session.recipe.technique("quant_lsq").zero_level
    optimizer = torch.optim.Adam(session.param_groups(lr=0.003))
    session.bind(optimizer)
    for step in range(96):
        i = (step % 16) * 32
        terms = session.loss(model(x[i:i + 32]), (x[i:i + 32], y[i:i + 32]))
        optimizer.zero_grad()
        session.backward(terms)
        session.before_step()
        optimizer.step()
        session.after_step()
    spec = session.finalize(x[:2])
    save(model, spec, tmp_path / "a", example_inputs=x[:2])
    on_disk = (tmp_path / "a" / "weights.jcw").stat().st_size
    assert goal * 0.9 <= on_disk <= goal * 1.02, (on_disk, goal)


@pytest.mark.parametrize("target", [{"ratio": 20}, {"speedup": 2.0, "batch": 1}])
def test_a_target_the_session_cannot_hold_is_refused_by_prepare_with_the_way_out(target):
    import jointcompress

    techniques = [{**TECHNIQUES[0], "sparsity": 0.5}, TECHNIQUES[1]] if "speedup" in target else TECHNIQUES
    # a latency target's way out is the channels' sparsity (the size target's joint form was named to it too)
    way_out = "set prune_structured.sparsity" if "speedup" in target else "mode: joint with the size target"
    with pytest.raises(RecipeError, match=way_out) as refused:
        jointcompress.prepare(_model(), {"mode": "sequential", "target": target, "techniques": techniques}, total_steps=10)
    assert ("size target" in str(refused.value)) == ("ratio" in target)  # each target's own way out only


def test_overlap_mode_keeps_masks_and_lsq_under_the_allocators_budgets():
    x, y = _data()
    recipe = {"mode": "overlap", "target": {"ratio": 20}, "techniques": TECHNIQUES,
              "training": {"epochs": 1, "batch_size": 64}}
    result = compress(_model(), recipe, (x, y), lambda m: 0.0)
    assert [t.type for t in result.recipe.techniques] == ["prune_unstructured", "quant_lsq"]
    assert result.recipe.technique("prune_unstructured").layer_sparsity  # per-layer budgets from the allocator
    assert not result.recipe.technique("quant_lsq").zero_level
    assert not [e for e in result.history.events if e["event"] == "joint_form"]


@pytest.mark.parametrize("change", [
    {"mode": "sequential"},
    {"mode": "overlap"},
    {"target": {"speedup": 2.0, "batch": 1}},
    {"target": None},
    {"techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True}, {"type": "size_budget", "penalty": 5.0}]},
])
def test_recipes_that_do_not_ask_for_the_joint_form_are_left_as_they_are(change):
    data = {"mode": "joint", "target": {"ratio": 20}, "techniques": TECHNIQUES, **change}
    if data["target"] is None or data["target"].get("speedup"):  # no size target sets the masks' sparsity
        data["techniques"] = [{**TECHNIQUES[0], "sparsity": 0.5}, TECHNIQUES[1]]
    recipe = parse_recipe(data)
    same, event = as_joint_form(recipe)
    assert same is recipe and event is None


def test_learned_widths_the_joint_form_fixes_are_said_and_a_range_without_the_dead_zone_refused():
    """A probe asked for learned widths in [2, 4] at bits 6 without zero_level: every layer was stored at 6 bits,
    without a word; with zero_level the joint form fixed the widths just as quietly."""
    learned = [TECHNIQUES[0], {**TECHNIQUES[1], "zero_level": True}]
    with pytest.warns(UserWarning, match=r"keeps every layer's width at quant_lsq.bits \(4\); to learn widths in "
                                         r"\[2, 8\] write size_budget"):
        joint, _ = as_joint_form(parse_recipe({"mode": "joint", "target": {"ratio": 20}, "techniques": learned}))
    assert joint.technique("quant_lsq").learn_bits is False
    fixed = [TECHNIQUES[0], {**TECHNIQUES[1], "zero_level": True, "learn_bits": False}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_joint_form(parse_recipe({"mode": "joint", "target": {"ratio": 20}, "techniques": fixed}))
    ranged = [{"type": "quant_lsq", "bits": 6, "learn_bits": True, "min_bits": 2, "max_bits": 4}]
    with pytest.raises(RecipeError, match=r"quant_lsq: min_bits/max_bits \(2, 4\) bound learned bit-widths.*without "
                                          r"zero_level: true every layer is stored at bits \(6\)"):
        parse_recipe({"techniques": ranged})
    assert parse_recipe({"techniques": [{**ranged[0], "zero_level": True, "bits": 3}, {"type": "size_budget"}],
                         "target": {"ratio": 10}}).technique("quant_lsq").max_bits == 4


def test_a_late_mask_start_becomes_a_budget_start_a_paced_window_allows():
    late = [{**TECHNIQUES[0], "start": 0.4, "end": 0.7}, TECHNIQUES[1]]
    joint, _ = as_joint_form(parse_recipe({"mode": "joint", "target": {"ratio": 20}, "techniques": late}))
    assert joint.technique("size_budget").start == 0.2 and joint.technique("size_budget").decide_steps == 1000


@pytest.mark.parametrize("target", [{"ratio": 20}, {"size_kb": 4}])
@pytest.mark.parametrize("mode", ["overlap", "sequential"])
def test_channel_pruning_under_a_size_target_is_refused_before_training_outside_mode_joint(mode, target):
    techniques = [TECHNIQUES[0], {"type": "prune_structured", "sparsity": 0.5}, TECHNIQUES[1]]
    with pytest.raises(RecipeError, match=r"techniques\.1 \(prune_structured\).*Use mode: joint.*latency_ms"):
        parse_recipe({"mode": mode, "target": target, "techniques": techniques})
    joint, _ = as_joint_form(parse_recipe({"mode": "joint", "target": target, "techniques": techniques}))
    assert joint.technique("prune_structured").sparsity == 0.5 and joint.technique("size_budget") is not None


def test_compares_default_joint_variants_train_what_compress_runs_for_mode_joint():
    from jointcompress.compare import DEFAULT_VARIANTS, VARIANTS, joint_options, joint_recipe

    recipe = parse_recipe({"mode": "joint", "target": {"ratio": 20}, "techniques": TECHNIQUES})
    ran = as_joint_form(recipe)[0].technique("size_budget")
    joint_variants = [v for v in DEFAULT_VARIANTS if VARIANTS[v][0] == "joint"]
    assert {VARIANTS[v][1] for v in joint_variants} == {"none", "scale", "pcgrad"} and "sequential" in DEFAULT_VARIANTS
    for variant in joint_variants:
        compared = joint_recipe(recipe, **joint_options(variant, total_steps=1876)).technique("size_budget")
        assert (compared.end, compared.freeze) == tuple(ran.paced(1876).values())
        same = {k: v for k, v in ran.model_dump().items() if k not in ("end", "freeze", "decide_steps")}
        assert {k: getattr(compared, k) for k in same} == same


def test_a_pruning_selection_the_joint_form_cannot_honour_is_refused_when_the_recipe_is_read():
    """The joint form prunes through quant_lsq's dead zones: an exclusion given to prune_unstructured
    alone would be dropped silently, and the layer pruned after all."""
    techniques = [{**TECHNIQUES[0], "exclude": ["head"]}, TECHNIQUES[1]]
    with pytest.raises(RecipeError, match=r"prune_unstructured selects others.*mode: overlap"):
        parse_recipe({"mode": "joint", "target": {"ratio": 20}, "techniques": techniques})
    both = [{**TECHNIQUES[0], "exclude": ["head"]}, {**TECHNIQUES[1], "exclude": ["head"]}]
    joint, _ = as_joint_form(parse_recipe({"mode": "joint", "target": {"ratio": 20}, "techniques": both}))
    assert joint.technique("quant_lsq").exclude == ["head"]
    for fine in ({"mode": "overlap"}, {"mode": "sequential"}, {"target": None}):
        data = {"mode": "joint", "target": {"ratio": 20}, "techniques": techniques, **fine}
        if data["target"] is None:
            data["techniques"] = [{**techniques[0], "sparsity": 0.5}, TECHNIQUES[1]]
        parse_recipe(data)


def test_a_run_shorter_than_log_every_still_counts_what_pcgrad_changed():
    """compare flags a strategy that changed nothing: it must read every measured step, not only the
    logged ones (a 32-step run logs step 0 alone, where the size term has not pulled yet)."""
    from jointcompress.pipeline import coordination_effect

    x, y = _data()
    recipe = {"mode": "joint", "target": {"ratio": 20}, "techniques": TECHNIQUES,
              "training": {"epochs": 2, "batch_size": 32}, "coordination": {"strategy": "pcgrad"}}
    result = compress(_model(), recipe, (x, y), lambda m: 0.0)
    counted = result.history.coordination
    assert len(result.history.steps) == 1  # one logged step
    assert 0 < counted["changed"] <= counted["measured"] <= 32  # after the freeze the size term is gone
    effect = coordination_effect(result.history)
    assert effect["changed_share"] == counted["changed"] / counted["measured"] > 0


def test_a_target_the_landing_cannot_reach_is_said_before_training_and_at_the_freeze_with_the_file_it_got(tmp_path):
    """Every output channel that keeps weights keeps its strongest one, so a target a little above the
    bytes no decision moves cannot be met: the run says so before training, ends over it, and says by
    how much at the freeze."""
    x, y = _data()
    model = _model()
    goal = dense_fp32_bytes(model) / 60
    fp16_steps = [TECHNIQUES[0], {**TECHNIQUES[1], "scale_format": "fp16"}]  # the floor this target sits just above
    recipe = {"mode": "joint", "target": {"ratio": 60}, "techniques": fp16_steps,
              "training": {"epochs": 4, "batch_size": 32}}
    with pytest.warns(UserWarning) as said:
        result = compress(model, recipe, (x, y), lambda m: 0.0)
    messages = [str(w.message) for w in said]
    early = [m for m in messages if "one weight kept in every output channel" in m]  # before training
    assert early and messages.index(early[0]) == 0, messages
    over = [w for w in said if re.search(r"ends at about [\d,]+ B \(as estimated at the freeze; .*\), [\d,]+ B "
                                         r"\([\d.]+%\) over the [\d,]+ B target.*target.size_kb >=", str(w.message))]
    # attributed to the package: attributed to torch.no_grad's wrapper, the command line printed it as a raw warning
    assert len(over) == 1 and "/jointcompress/" in over[0].filename, messages
    budget = next(t for t in result.techniques if t.kind == "size_budget")
    missed = next(e for e in budget.events if e["event"] == "size_target_missed")
    spec = finalize(model, result.example_inputs)
    save(model, spec, tmp_path / "a", example_inputs=result.example_inputs)
    on_disk = (tmp_path / "a" / "weights.jcw").stat().st_size
    assert on_disk > goal and missed["bytes"] > missed["target_bytes"] == round(goal)
    assert abs(on_disk - missed["bytes"]) <= 0.02 * on_disk  # the warning's number is the file's


def test_the_missed_target_counts_the_channels_and_normalization_bytes_the_file_holds():
    """With prune_structured beside the size budget, the freeze's warning counted the channels it removes as live
    (68 of a finalized 36) and their BatchNorm bytes (512 B in a 386 B file)."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                             nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))

    torch.manual_seed(0)
    x, y = torch.randn(256, 3, 8, 8), torch.randint(0, 4, (256,))
    model = build()
    recipe = {"mode": "joint", "target": {"ratio": 125}, "training": {"epochs": 3, "batch_size": 64},
              "techniques": [{"type": "prune_structured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4}]}
    with pytest.warns(UserWarning) as said:
        result = compress(model, recipe, (x, y), lambda m: 0.0)
    budget = next(t for t in result.techniques if t.kind == "size_budget")
    missed = next(e for e in budget.events if e["event"] == "size_target_missed")
    result.finalize()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert missed["live_channels"] == sum(int((m.weight != 0).flatten(1).any(1).sum()) for m in layers)
    norm_bytes = sum(8 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # fp16, 4 tensors
    message = next(str(w.message) for w in said if "over the" in str(w.message) and "ends at about" in str(w.message))
    assert f"BatchNorm layers hold about {norm_bytes:,} B" in message, message


def test_the_channel_floor_warning_names_the_fp32_embedding_table_and_the_settings_that_shrink_it():
    """A target under the one-weight-per-channel file where most bytes are an fp32 embedding table: the
    warning names the table and the settings that quantize it (quant_lsq and prune_unstructured's
    `embeddings`), which move those bytes into the run's decisions."""
    import jointcompress

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.table = nn.Embedding(256, 32)
            self.head = nn.Sequential(nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 4))  # many channels: a floor over the table

        def forward(self, ids):
            return self.head(self.table(ids).mean(1))

    ids = torch.randint(0, 256, (8, 6))
    techniques = [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4}]

    def session(target):
        return jointcompress.prepare(Tokens(), {"mode": "joint", "target": target, "techniques": techniques},
                                     total_steps=20, example_inputs=ids)

    budget = next(t for t in session({"ratio": 1.2}).techniques if t.kind == "size_budget")
    fixed, floor, reachable = budget.fixed, budget.channel_floor_bytes(), budget.fixed / (1 - budget.config.margin)
    assert fixed > 256 * 32 * 4 and floor > reachable  # the fp32 table is in the bytes no decision moves
    with pytest.warns(UserWarning, match="one weight kept in every output channel") as said:
        session({"size_kb": (reachable + floor) / 2 / 1024})  # over what no decision moves, under the floor
    message = next(str(w.message) for w in said if "output channel" in str(w.message))
    assert "embedding tables (table) hold 32,768 B of it in fp32" in message
    assert "quant_lsq.embeddings: true" in message and "prune_unstructured.embeddings: true" in message


def test_a_target_whose_aim_alone_is_under_the_channel_floor_warns_that_layers_may_be_emptied():
    """Target 0.5% over the one-weight-per-channel file: the run aims 1% under the target (the margin), so it
    landed by emptying whole layers (a re-checker's attention model: six layers 100% zero), with no word."""
    import jointcompress

    torch.manual_seed(0)
    techniques = [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4}]

    def session(target):
        model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 4))
        return jointcompress.prepare(model, {"mode": "joint", "target": target, "techniques": techniques},
                                     total_steps=20, example_inputs=torch.randn(4, 16))

    budget = next(t for t in session({"ratio": 2}).techniques if t.kind == "size_budget")
    floor = budget.channel_floor_bytes()
    with pytest.warns(UserWarning, match=r"aims at .* less size_budget.margin\), under about .* whole layers"):
        session({"size_kb": floor * 1.005 / 1024})


def test_channels_and_a_size_target_in_two_runs_the_refusal_names_and_that_work(tmp_path):
    """prune_structured is refused beside a size target outside mode joint (the allocator does not price
    removed channels), with the ways to have both; one of them: channel pruning first (finalize removes
    the channels), then the size target on the smaller model, where the joint form lands the file on it."""
    x, y = _data()
    model = _model()
    with pytest.raises(RecipeError, match="Use mode: joint.*compress in two runs: prune_structured first"):
        parse_recipe({"mode": "sequential", "target": {"ratio": 20}, "techniques": [{"type": "prune_structured", "sparsity": 0.5}]})
    first = compress(model, {"training": {"epochs": 2, "batch_size": 32}, "techniques": [{"type": "prune_structured",
                                                                                         "sparsity": 0.5}]}, (x, y), lambda m: 0.0)
    finalize(model, first.example_inputs)
    assert model[0].out_features == 64 and model[2].out_features == 32  # the channels are gone
    goal = dense_fp32_bytes(model) / 10
    recipe = {"mode": "joint", "target": {"size_kb": goal / 1024}, "techniques": TECHNIQUES,
              "training": {"epochs": 6, "batch_size": 32, "lr": 0.003}}
    second = compress(model, recipe, (x, y), lambda m: 0.0)
    assert second.recipe.technique("size_budget") is not None
    spec = finalize(model, second.example_inputs)
    save(model, spec, tmp_path / "a", builder=_model, example_inputs=second.example_inputs)
    on_disk = (tmp_path / "a" / "weights.jcw").stat().st_size
    assert goal * 0.9 <= on_disk <= goal * 1.02, (on_disk, goal)
    loaded = load(tmp_path / "a", _model)  # the first run's channels are in the second artifact's history
    assert loaded[0].out_features == 64 and torch.equal(loaded(x[:8]), model.eval()(x[:8]))


@pytest.mark.parametrize("criterion", ["learned", "magnitude"])
def test_channels_and_a_size_target_in_one_joint_run_the_budget_lands_the_file_with_the_channels_gone(tmp_path, criterion):
    """mode: joint keeps prune_structured beside its size budget: the budget measures the file as finalize
    will write it (the masked channels removed, the learned criterion's soft masks as they decide now) and
    lands the rest of the bytes on the target; the artifact loads from the dense builder."""
    x, y = _data()
    model = _model()
    goal = dense_fp32_bytes(model) / 40
    recipe = {"mode": "joint", "target": {"ratio": 40}, "training": {"epochs": 6, "batch_size": 32, "lr": 0.003},
              "techniques": [{"type": "prune_structured", "sparsity": 0.25, "criterion": criterion},
                             *TECHNIQUES]}
    result = compress(model, recipe, (x, y), lambda m: 0.0)
    channels, quant = result.recipe.technique("prune_structured"), result.recipe.technique("quant_lsq")
    budget = result.recipe.technique("size_budget")
    assert channels.end == quant.start == budget.start == 0.2  # the channels first, then the bits and the bytes
    event = next(e for e in result.history.events if e["event"] == "joint_form")
    assert event["channels_first"] == {"prune_structured_end": 0.2, "quant_lsq_start": 0.2}
    model.eval()
    with torch.no_grad():
        masked = model(x[:16])
    spec = finalize(model, result.example_inputs)
    assert model[0].out_features == 96 and model[2].out_features == 48  # a quarter of the channels are gone
    save(model, spec, tmp_path / "a", builder=_model, example_inputs=result.example_inputs)
    on_disk = (tmp_path / "a" / "weights.jcw").stat().st_size
    assert goal * 0.97 <= on_disk <= goal * 1.0, (on_disk, goal)
    loaded = load(tmp_path / "a", _model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:16]), masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget_start, event", [(None, "size_budget_slack"), (0.0, "size_target_undershot")])
def test_a_target_the_channels_already_undershoot_is_said(budget_start, event):
    """Channel pruning beside the budget can leave fewer bytes than the target allows (fixed widths cannot
    spend them): said when the budget starts after the channels are gone (the joint form's order), else at
    the freeze, with how far under the file ends and what would spend the bytes."""
    x, y = _data()
    techniques = [{"type": "prune_structured", "sparsity": 0.5, "end": 0.2}, {**TECHNIQUES[1], "zero_level": True, "start": 0.0}]
    recipe = {"mode": "joint", "target": {"ratio": 10}, "training": {"epochs": 3, "batch_size": 32}, "techniques": techniques}
    if budget_start is not None:  # the joint form spelled out, its budget deciding beside the channels
        recipe["techniques"] = [*techniques, {"type": "size_budget", "start": budget_start, "end": 0.5, "freeze": 0.8}]
    with pytest.warns(UserWarning, match=r"under the .* target.*prune_structured"):
        result = compress(_model(), recipe, (x, y), lambda m: 0.0)
    budget = next(t for t in result.techniques if t.kind == "size_budget")
    assert any(e["event"] == event for e in budget.events)


def test_a_target_only_the_channel_pruning_makes_reachable_is_trained_not_refused(tmp_path):
    """Before training the budget refuses a target under the bytes no decision moves (BatchNorm, steps,
    biases); those bytes shrink with the channels prune_structured removes, so beside it the budget
    trains and the landing, measuring the file without them, reaches the target."""
    from jointcompress.models import build_model
    from jointcompress.targets import TargetError

    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    recipe = {"mode": "joint", "target": {"ratio": 100}, "training": {"epochs": 6, "batch_size": 32},
              "techniques": [{"type": "quant_lsq", "bits": 4, "scale_format": "fp16"}]}  # fixed bytes over 100x
    with pytest.raises(TargetError, match="cannot be reached"):
        compress(build_model("resnet"), recipe, (x, y), lambda m: 0.0)
    model = build_model("resnet")
    recipe["techniques"] = [{"type": "prune_structured", "sparsity": 0.5}, *recipe["techniques"]]
    result = compress(model, recipe, (x, y), lambda m: 0.0)
    spec = finalize(model, result.example_inputs)
    save(model, spec, tmp_path / "a", builder=lambda: build_model("resnet"), example_inputs=result.example_inputs)
    goal = dense_fp32_bytes(build_model("resnet")) / 100
    assert goal * 0.97 <= (tmp_path / "a" / "weights.jcw").stat().st_size <= goal


class _CountedImages(torch.utils.data.Dataset):
    """Random 1x28x28 images; counts the images training draws."""

    def __init__(self, n: int):
        torch.manual_seed(0)
        self.x, self.y, self.drawn = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)), 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.drawn += 1
        return self.x[i], self.y[i]


def test_a_target_under_the_bytes_left_once_the_channels_go_is_refused_before_the_first_step_and_the_floor_warned():
    """The bytes no decision moves shrink with the channels prune_structured removes, so the check before
    training counts them at the widths the run ends with (not at step 0's, where every channel is still
    there): a target under them is refused before the first step, with the number the freeze would have
    said after the whole run, naming prune_structured.sparsity; one just over them trains (the test above),
    warned before training where it is under the file with one weight in every channel that stays."""
    from jointcompress.models import build_model
    from jointcompress.targets import TargetError
    from jointcompress.techniques import build
    from jointcompress.techniques.base import RunContext
    from jointcompress.techniques.size_estimate import measured_bytes

    data = _CountedImages(128)
    recipe = {"mode": "joint", "target": {"ratio": 300}, "training": {"epochs": 6, "batch_size": 32},
              "techniques": [{"type": "prune_structured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4}]}
    with pytest.raises(TargetError, match=r"cannot be reached: ([\d,]+) B of the weights file once the channels "
                                          r"prune_structured removes \(sparsity 0.5\) are gone.*or raise prune_structured.sparsity") as refused:
        compress(build_model("resnet"), recipe, data, lambda m: 0.0)
    assert data.drawn <= 32  # at most the batch the example inputs come from: not one training step
    fixed = int(re.search(r"([\d,]+) B of the weights file", str(refused.value)).group(1).replace(",", ""))
    # what the budget measures once the channels are gone: the model with the channels already removed, quantized
    # as the run quantizes it (a size target stores normalization layers in fp16 and step sizes in log8)
    shrunk = build_model("resnet")
    result = compress(shrunk, {"training": {"epochs": 1, "batch_size": 32}, "techniques": recipe["techniques"][:1]},
                      data, lambda m: 0.0)
    finalize(shrunk, result.example_inputs)
    quant = parse_recipe({"techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True, "norm_format": "fp16",
                                          "scale_format": "log8"}]})
    build(quant.techniques[0]).setup(RunContext(model=shrunk, example_inputs=result.example_inputs))
    real = measured_bytes(shrunk)
    assert abs(fixed - (real["total"] - real["variable"])) <= 8  # the container's names may differ by a few bytes
    # over those bytes but under the file with one weight in every channel that stays: warned before training
    recipe = {**recipe, "target": {"size_kb": (fixed + 100) / 1024}, "training": {"epochs": 1, "batch_size": 32}}
    with pytest.warns(UserWarning) as said:
        compress(build_model("resnet"), recipe, data, lambda m: 0.0)
    assert re.search(r"one weight kept in every output channel once the channels prune_structured removes \(sparsity 0.5\) "
                     r"are gone.*"
                     r"or raise prune_structured.sparsity", str(said[0].message)), [str(w.message) for w in said]
    # scope: global learns the widths: only a target under the file with every group at its fewest channels is
    # refused before training (a floor no run goes under)
    recipe = {**recipe, "target": {"ratio": 3000}, "techniques": [{**recipe["techniques"][0], "scope": "global"},
                                                                   *recipe["techniques"][1:]]}
    with pytest.raises(TargetError, match=r"once every channel group of prune_structured is at its fewest \(min_keep\)"):
        compress(build_model("resnet"), recipe, data, lambda m: 0.0)


def test_the_channels_end_state_is_seen_without_moving_the_masks():
    """prune_structured.at_end: every group at the width its ramp ends with (scope layer: exactly
    sparsity of each group), and on leaving the masks are as they were, bit for bit."""
    from jointcompress.techniques import build
    from jointcompress.techniques.base import RunContext

    model = _model()
    channels = build(parse_recipe({"techniques": [{"type": "prune_structured", "sparsity": 0.5}]}).techniques[0])
    channels.setup(RunContext(model=model, example_inputs=torch.randn(2, 32), total_steps=100))
    before = {k: v.clone() for k, v in channels.masks.state_dict().items()}
    with channels.at_end():
        for mask, group in zip(channels._group_masks(), channels.groups):
            assert int(mask.hard.sum()) == round(group.channels * 0.5) and float(mask.temperature) == 0.0
    after = channels.masks.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert channels.counts_known()
    glob = build(parse_recipe({"techniques": [{"type": "prune_structured", "sparsity": 0.5, "scope": "global",
                                               "min_keep": 0.25}]}).techniques[0])
    glob.setup(RunContext(model=_model(), example_inputs=torch.randn(2, 32), total_steps=100))
    assert not glob.counts_known()
    with glob.at_end():  # the widths are learned: every group at its fewest channels, a floor no run goes under
        for mask, group in zip(glob._group_masks(), glob.groups):
            assert int(mask.hard.sum()) == max(1, round(group.channels * 0.25))


def test_beside_channels_the_budget_keeps_its_decision_window_in_a_long_run():
    """The joint form starts the budget after prune_structured's channels (at 0.2 of the run); its paced
    window (~1,000 steps of decisions) counts from there. Counted from step 0, a run of 10,000 steps
    gave it none: `end` fell on its start, and the whole descent was left to the cuts before the freeze."""
    from jointcompress import techniques as tech
    from jointcompress.plan import make_plan

    recipe = parse_recipe({"mode": "joint", "target": {"ratio": 50}, "techniques": [
        {"type": "prune_structured", "sparsity": 0.5}, {"type": "prune_unstructured", "sparsity": 0.9},
        {"type": "quant_lsq", "bits": 4}]})
    joint, _ = as_joint_form(recipe)
    techniques = [tech.build(c) for c in joint.techniques]
    plan = make_plan(techniques, 10_000, joint)
    budget = next(t for t in techniques if t.kind == "size_budget")
    channels = next(t for t in techniques if t.kind == "prune_structured")
    assert channels.window[1] == budget.window[0] == 2_000  # the channels first, then the budget
    decide = JOINT_OPTIONS[JOINT_FORM_VARIANT]["decide_steps"]
    assert budget.window == (2_000, 2_000 + decide) and plan.freeze[id(budget)] == 2_000 + decide + decide // 2


def test_compare_trains_the_window_compress_trains_for_a_late_mask_start_in_a_long_run():
    """compare's joint variants and compress() resolve a paced window alike: from the budget's start
    (a late mask start moved to 0.2), not from step 0. Before, compare kept the late start (0.4) with a
    window resolved from step 0 (end 0.2), a recipe its own validator refused."""
    from jointcompress.compare import variant_recipe

    late = [{**TECHNIQUES[0], "start": 0.4, "end": 0.7}, TECHNIQUES[1]]
    recipe = parse_recipe({"mode": "joint", "target": {"ratio": 20}, "techniques": late})
    ran = as_joint_form(recipe)[0].technique("size_budget")
    compared = variant_recipe(recipe, JOINT_FORM_VARIANT, 0, targeted=recipe, model=_model(),
                              example=torch.randn(2, 32), total_steps=10_000).technique("size_budget")
    assert compared.start == ran.start == 0.2 and compared.decide_steps is None
    assert (compared.end, compared.freeze) == tuple(ran.paced(10_000).values()) == (0.3, 0.35)


@pytest.mark.parametrize("ratio, scale_format, warned", [(12, "fp16", True), (12, "log8", True), (4, "fp16", False)])
def test_a_target_the_fixed_bytes_take_most_of_is_said_before_training_with_what_shrinks_them(ratio, scale_format, warned):
    """Reachable, but the weights get what the step sizes, biases and normalization layers leave: on a small
    model at an aggressive ratio accuracy fell without a word on why."""
    import warnings

    import jointcompress

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 4))
    recipe = {"mode": "joint", "target": {"ratio": ratio}, "techniques": [{"type": "quant_lsq", "bits": 4, "scale_format": scale_format}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jointcompress.prepare(model, recipe, total_steps=20, example_inputs=torch.randn(8, 32))
    said = [str(w.message) for w in caught if "do not depend on what the run decides" in str(w.message)]
    assert len(said) == int(warned), [str(w.message) for w in caught]
    if warned:
        share = int(re.search(r"target \((\d+)%\)", said[0]).group(1))
        assert share >= 50 and "1.weight 512 B" in said[0] and "the weights share the" in said[0]  # BatchNorm, in fp16
        assert ("quant_lsq.scale_format: log8 stores each of the 260 step sizes" in said[0]) == (scale_format == "fp16")
        assert "quant_lsq.per_channel: false stores one step per layer" in said[0]  # once dropped beside log8 steps


def test_a_file_the_learned_widths_left_under_the_target_is_said_with_the_advice_for_that_run():
    """A short run whose learned widths ended low (2/4/6 bits, frozen at the freeze) was told to learn the widths
    with quant_lsq.learn_bits: true (it did) and to lower a prune_structured sparsity the recipe did not have."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(384, 3, 16, 16, generator=g), torch.randint(0, 10, (384,), generator=g)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 128), torch.nn.ReLU(),
                                  torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    recipe = {"mode": "joint", "target": {"ratio": 20}, "training": {"epochs": 4, "batch_size": 32},
              "techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True, "learn_bits": True, "scale_format": "fp16"},
                             {"type": "distill_kd", "temperature": 4, "alpha": 0.7}, {"type": "size_budget"}]}
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        compress(copy.deepcopy(teacher), recipe, (x, y), lambda m: 0.0, teacher=teacher)
    under = [str(w.message) for w in said if "under the" in str(w.message) and "left fewer bytes" in str(w.message)]
    assert len(under) == 1 and "the widths learned (frozen since)" in under[0] and "more steps" in under[0], under
    assert "prune_structured" not in under[0] and "learn_bits: true" not in under[0]


@pytest.mark.parametrize("techniques", [
    [{"type": "quant_lsq", "bits": 4}],
    [{"type": "prune_unstructured"}, {"type": "distill_kd"}],  # the quant_lsq it adds learned its widths (2-3 bits)
])
def test_the_bare_joint_form_keeps_widths_fixed_where_it_adds_quant_lsq_too(techniques):
    """docs/joint.md: the bare form keeps widths fixed (write size_budget into the recipe to learn them); the
    quant_lsq it added to a recipe without one took learn_bits' default, on, and stored 2-3-bit layers."""
    recipe = parse_recipe({"mode": "joint", "target": {"ratio": 40}, "techniques": techniques})
    for given in (recipe, parse_recipe(recipe.model_dump())):  # a recipe dumped and read back too
        joint, event = as_joint_form(given)
        assert event is not None and joint.technique("quant_lsq").learn_bits is False


def test_the_quantizer_the_joint_form_adds_to_a_recipe_without_one_is_said():
    """A recipe of pruning and distillation under `mode: joint` and a ratio came back as a 4-bit quantized file,
    said only in the manifest's recipe; sequential says what its allocator adds."""
    bare = parse_recipe({"mode": "joint", "target": {"ratio": 40}, "techniques": [{"type": "prune_unstructured"}]})
    with pytest.warns(UserWarning, match=r"quant_lsq was added to the recipe \(4 bits, zero_level: true"):
        joint, _ = as_joint_form(bare)
    assert joint.technique("quant_lsq").bits == 4
    quantized = parse_recipe({"mode": "joint", "target": {"ratio": 40},
                              "techniques": [{"type": "quant_lsq", "bits": 3, "learn_bits": False}]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_joint_form(quantized)


@pytest.mark.parametrize("grid", [{"nonzero_grid": True}, {}])  # asked for, and the joint form's choice at 2 bits
def test_the_nonzero_grid_keeps_four_levels_at_two_bits_lands_on_the_target_and_loads_the_same_logits(tmp_path, grid):
    """quant_lsq.nonzero_grid: at 2 bits a kept weight is +-1 or +-2 steps (the dead-zone quantizer otherwise keeps +-1
    only, its zero code unused: the artifact stores zero by position); the file holds them at 2 bits each, in the
    bitmask layout, lands on its target and loads back to the same logits."""
    x, y = _data()
    model = _model()
    goal = dense_fp32_bytes(model) / 20
    recipe = {"mode": "joint", "target": {"ratio": 20},
              "techniques": [TECHNIQUES[0], {**TECHNIQUES[1], "bits": 2, **grid}],
              "training": {"epochs": 6, "batch_size": 32, "lr": 0.003}}
    result = compress(model, recipe, (x, y), lambda m: 0.0)
    assert result.recipe.technique("quant_lsq").nonzero_grid
    spec = finalize(model, result.example_inputs)
    modules = dict(model.named_modules())
    for name, ls in spec.layers.items():
        q = modules[name].weight.detach() / ls.scale.view(-1, 1)
        assert ls.nonzero_levels and ls.bits == 2 and torch.allclose(q, q.round(), atol=1e-3)
        assert set(q.round().unique().tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0}
    levels = torch.cat([(modules[n].weight.detach() / ls.scale.view(-1, 1)).round().flatten() for n, ls in spec.layers.items()])
    assert (levels.abs() == 2).any() and (levels.abs() == 1).any()
    manifest = save(model, spec, tmp_path / "a", example_inputs=result.example_inputs)
    assert {r["levels"] for r in manifest["layers"].values()} == {"nonzero"}
    assert {r["encoding"] for r in manifest["layers"].values()} == {"bitmask"}
    on_disk = (tmp_path / "a" / "weights.jcw").stat().st_size
    assert goal * 0.9 <= on_disk <= goal * 1.02, (on_disk, goal)
    loaded, loaded_spec = load_with_spec(tmp_path / "a", _model)
    model.eval()
    loaded.eval()
    assert torch.equal(model(x[:64]), loaded(x[:64]))
    assert all(ls.nonzero_levels for ls in loaded_spec.layers.values())


@pytest.mark.parametrize("bits, grid, chosen", [(2, None, True), (2, False, False), (2, True, True), (3, None, False),
                                               (4, None, False), (3, True, True)])
def test_the_joint_form_puts_two_bit_weights_on_the_nonzero_grid_unless_the_recipe_says(bits, grid, chosen):
    """At 2 bits the dead-zone grid spent 2 of its 4 codes on nothing (zero is stored by position); the joint form now
    takes the nonzero grid there, as BENCHMARKS.md measured it, where the recipe leaves quant_lsq.nonzero_grid unset;
    what a recipe writes stays, and so does every other width. A recipe dumped and read back (a resolved recipe, with
    every field set) chooses the same; compare's joint variants stay as named (joint-paced-obdland-none keeps
    the symmetric grid at 2 bits)."""
    from jointcompress.compare import variant_recipe
    from jointcompress.joint_form import joint_form_variant

    quant = {"type": "quant_lsq", "bits": bits, **({} if grid is None else {"nonzero_grid": grid})}
    recipe = parse_recipe({"mode": "joint", "target": {"ratio": 40}, "techniques": [{"type": "prune_unstructured"}, quant]})
    for given in (recipe, parse_recipe(recipe.model_dump())):
        joint, event = as_joint_form(given)
        assert joint.technique("quant_lsq").nonzero_grid is chosen and event["nonzero_grid"] is chosen
    assert joint_form_variant(bits) == ("joint-paced-obdland-nz-none" if bits == 2 else JOINT_FORM_VARIANT)
    if grid is None:
        compared = variant_recipe(recipe, "joint-paced-obdland-none", 0, targeted=recipe, model=_model(),
                                  example=torch.zeros(2, 32))
        assert compared.technique("quant_lsq").nonzero_grid is False


@pytest.mark.parametrize("bits, grid, nonzero", [(2, None, True), (2, False, False), (4, None, False)])
def test_compares_default_set_runs_what_compress_runs_at_each_width(bits, grid, nonzero):
    """compare's default joint variants stayed on the symmetric grid at 2 bits while compress took the nonzero grid
    there: its table weighed another model than the one a user gets."""
    from jointcompress.compare import DEFAULT_VARIANTS, JOINT_OPTIONS, VARIANTS, default_variants

    quant = {"type": "quant_lsq", "bits": bits, **({} if grid is None else {"nonzero_grid": grid})}
    recipe = parse_recipe({"mode": "joint", "target": {"ratio": 40}, "techniques": [{"type": "prune_unstructured"}, quant]})
    chosen = default_variants(recipe)
    assert len(chosen) == len(DEFAULT_VARIANTS) and chosen[-1] == "sequential"
    assert [VARIANTS[v] for v in chosen] == [VARIANTS[v] for v in DEFAULT_VARIANTS]  # each coordination strategy
    joint, _ = as_joint_form(recipe)
    for variant in chosen[:-1]:  # each joint variant trains the grid compress trains
        assert bool(JOINT_OPTIONS[variant].get("nonzero_grid")) is nonzero is joint.technique("quant_lsq").nonzero_grid


@pytest.mark.parametrize("quant, words", [({"nonzero_grid": True}, "add zero_level: true with learn_bits: false"),
                                          ({"zero_level": True, "nonzero_grid": True, "learn_bits": False, "bits": 8},
                                           "at most 7 bits, not bits 8: .*; set bits: 7 or less"),
                                          ({"zero_level": True, "nonzero_grid": True},
                                           r"not max_bits 8 \(widths learned\).*; set learn_bits: false \(widths fixed")])
def test_the_nonzero_grid_outside_its_range_is_refused_by_name(quant, words):
    with pytest.raises(RecipeError, match=words):
        parse_recipe({"techniques": [{"type": "quant_lsq", **quant}]})


def test_the_first_refusal_of_the_nonzero_grid_gives_a_fix_that_parses():
    """Its advice, "add zero_level: true", led to a second refusal (learned widths reach max_bits 8): a chain."""
    parse_recipe({"techniques": [{"type": "quant_lsq", "bits": 2, "nonzero_grid": True, "zero_level": True,
                                  "learn_bits": False}]})

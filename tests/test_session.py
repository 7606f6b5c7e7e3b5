"""The compression session in a plain loop: any output and batch type, the user's loss,
checkpoints of the user's loop that resume bit for bit, token-level distillation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import jointcompress
from jointcompress import DataError, RecipeError, compress
from jointcompress.techniques import learned_width as lw
from jointcompress.techniques.distill_kd import kd_loss

RECIPE = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.6, "end": 0.5},
                         {"type": "quant_lsq", "bits": 4, "start": 0.5}],
          "coordination": {"strategy": "pcgrad", "every": 2}}


def _data(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, :3].sum(1) > 0).long()


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 2))


def _batches(epoch, x, y, bs=32):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
    return [(x[order[i:i + bs]], y[order[i:i + bs]]) for i in range(0, len(x), bs)]


def _train(model, session, optimizer, epochs, x, y, after_step=None):
    for epoch in epochs:
        for xb, yb in _batches(epoch, x, y):
            terms = session.loss(model(xb), (xb, yb))
            optimizer.zero_grad()
            session.backward(terms)
            session.before_step()
            optimizer.step()
            session.after_step()
            if after_step is not None:
                after_step()


def _start(seed=0):
    model = _mlp(seed)
    session = jointcompress.prepare(model, RECIPE, total_steps=4 * 4)
    optimizer = torch.optim.Adam(session.param_groups(lr=1e-2))
    session.bind(optimizer)
    return model, session, optimizer


def test_user_loop_checkpoint_resumes_bit_for_bit(tmp_path):
    x, y = _data()
    model, session, opt = _start()
    _train(model, session, opt, range(4), x, y)
    # the checkpoint is taken at step 8, when quant_lsq has just attached: the resumed session
    # must attach it again, and add its step sizes to the optimizer before that loads
    m2, s2, o2 = _start()
    _train(m2, s2, o2, range(2), x, y)
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "session": s2.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    m3, s3, o3 = _start(seed=5)  # other initial weights: everything must come from the checkpoint
    s3.load_state_dict(ck["session"])
    m3.load_state_dict(ck["model"])
    o3.load_state_dict(ck["opt"])
    _train(m3, s3, o3, range(2, 4), x, y)
    assert s3.step == session.step == 16
    a, b = model.state_dict(), m3.state_dict()
    assert a.keys() == b.keys() and any("log_step" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    p = next(t for t in session.techniques if t.kind == "prune_unstructured")
    assert abs(p.achieved_sparsity() - 0.6) < 0.01 and p.at_target()


LEARNED_WIDTHS = {"techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True, "learn_bits": True, "compile": False},
                                 {"type": "size_budget", "target_bytes": 400.0, "end": 0.6, "freeze": 0.8}],
                  "coordination": {"strategy": "pcgrad", "every": 2}}


def test_learned_widths_resume_bit_for_bit_between_the_fisher_folds(tmp_path):
    """The checkpoint falls between two folds of the Fisher estimate (steps 4 and 8): the resumed
    run prices the widths with the noise of the last fold, from the state, as the original did."""
    x, y = _data(n=96)  # 3 batches an epoch: the checkpoint at step 6

    def start(seed):
        model = _mlp(seed)
        session = jointcompress.prepare(model, LEARNED_WIDTHS, total_steps=12)
        optimizer = torch.optim.Adam(session.param_groups(lr=1e-2))
        session.bind(optimizer)
        return model, session, optimizer

    model, session, opt = start(0)
    _train(model, session, opt, range(4), x, y)
    m2, s2, o2 = start(0)
    _train(m2, s2, o2, range(2), x, y)
    assert s2.step == 6 and 6 % lw.FISHER_EVERY
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "session": s2.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    m3, s3, o3 = start(5)
    s3.load_state_dict(ck["session"])
    # step 6's schedule update ran before the save: the techniques must still read step 6, not
    # the step of the last attach event the rebuild replayed (0)
    assert ck["session"]["begun"] and s3.ctx.step == 6
    m3.load_state_dict(ck["model"])
    o3.load_state_dict(ck["opt"])
    _train(m3, s3, o3, range(2, 4), x, y)
    a, b = model.state_dict(), m3.state_dict()
    assert any(k.endswith("width_noise") and float(v) > 0 for k, v in a.items())
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_technique_parameters_that_attach_later_join_the_bound_optimizer():
    model, session, opt = _start()
    before = sum(len(g["params"]) for g in opt.param_groups)
    x, y = _data()
    _train(model, session, opt, range(3), x, y)
    quant = next(t for t in session.techniques if t.kind == "quant_lsq")
    assert quant.attached
    steps = [p for g in quant.parameters() for p in g["params"]]
    have = {id(p) for g in opt.param_groups for p in g["params"]}
    assert steps and all(id(p) in have for p in steps)
    assert sum(len(g["params"]) for g in opt.param_groups) == before + len(steps)
    assert all(p.grad is not None for p in steps)  # they are trained


@pytest.mark.parametrize("make", [
    lambda opt, n: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / n),
    lambda opt, n: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=n),
    lambda opt, n: torch.optim.lr_scheduler.SequentialLR(opt, [torch.optim.lr_scheduler.LinearLR(opt, total_iters=4),
                                                              torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)], [4]),
], ids=["lambda", "one-cycle", "sequential"])
def test_a_group_that_attaches_later_follows_the_bound_schedulers_schedule_at_its_own_rate(make):
    """LambdaLR stopped with "zip() argument 2 is shorter than argument 1" and OneCycleLR with a
    KeyError once quant_lsq's group joined at step 8."""
    model = _mlp()
    recipe = {**RECIPE, "techniques": [RECIPE["techniques"][0], {**RECIPE["techniques"][1], "step_lr": 2.5e-3}]}
    session = jointcompress.prepare(model, recipe, total_steps=16)
    opt = torch.optim.Adam(session.param_groups(lr=1e-2))
    sched = make(opt, 16)
    session.bind(opt, sched)
    x, y = _data()

    def step_and_check():
        sched.step()
        if len(opt.param_groups) > 1:
            assert opt.param_groups[1]["lr"] == pytest.approx(opt.param_groups[0]["lr"] * 0.25)

    _train(model, session, opt, range(4), x, y, after_step=step_and_check)
    assert len(opt.param_groups) == 2 and opt.param_groups[-1]["name"] == "quant_steps"


def test_a_group_that_attaches_later_joins_reduce_lr_on_plateau_at_the_rate_it_has_cut_to():
    """ReduceLROnPlateau keeps no initial_lr, so the first group's current, already cut rate was read as its base
    and quant_lsq's group joined at its full rate, not the rate the schedule had cut to."""
    model = _mlp()
    recipe = {**RECIPE, "techniques": [RECIPE["techniques"][0], {**RECIPE["techniques"][1], "step_lr": 2.5e-3}]}
    session = jointcompress.prepare(model, recipe, total_steps=16)
    opt = torch.optim.Adam(session.param_groups(lr=1e-2))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    session.bind(opt, sched)
    x, y = _data()
    steps = iter(range(100))
    _train(model, session, opt, range(4), x, y, after_step=lambda: sched.step(float(next(steps))))  # never improves
    assert len(opt.param_groups) == 2 and opt.param_groups[0]["lr"] < 1e-2 / 4  # cut before the group joined
    assert opt.param_groups[1]["lr"] == pytest.approx(opt.param_groups[0]["lr"] * 0.25)


def test_a_scheduler_not_bound_is_named_when_a_group_joins_later():
    model, session, opt = _start()
    torch.optim.lr_scheduler.StepLR(opt, 4)
    x, y = _data()
    with pytest.warns(UserWarning, match=r"session.bind\(optimizer, scheduler\)"):
        _train(model, session, opt, range(3), x, y)


class _DictOut(nn.Module):
    """A model with keyword inputs returning a dict (HF-like), for dict batches."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()

    def forward(self, features, labels=None):
        logits = self.net(features)
        return {"logits": logits, "extra": logits.sum()}


def test_dict_batches_dict_outputs_and_a_user_loss_in_compress():
    x, y = _data()
    ds = [{"features": x[i], "labels": y[i]} for i in range(len(x))]
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = []

    def loss_fn(outputs, batch):
        seen.append(sorted(batch))
        return nn.functional.cross_entropy(outputs["logits"], batch["labels"], label_smoothing=0.1)

    model = _DictOut()
    teacher = copy.deepcopy(model).eval()
    rec = {"techniques": RECIPE["techniques"] + [{"type": "distill_kd", "alpha": 0.5}], "training": {"epochs": 2}}
    res = compress(model, rec, loader, lambda m: {"accuracy": 0.5}, teacher=teacher, loss_fn=loss_fn)
    assert seen and seen[0] == ["features", "labels"]
    assert set(res.history.epochs[-1]["losses"]) == {"task", "distill"}
    assert isinstance(res.example_inputs, dict) and res.example_inputs["features"].shape == (2, 12)
    assert abs(res.summary()["prune_unstructured.sparsity"] - 0.6) < 0.01


class _TokenClassifier(nn.Module):
    def __init__(self, vocab=30):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, ids):
        return self.out(self.emb(ids).mean(1))


def test_integer_token_ids_are_accepted_and_bool_inputs_refused():
    ids = torch.randint(0, 30, (64, 8))
    labels = (ids[:, 0] > 15).long()
    res = compress(_TokenClassifier(), {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5}],
                                        "training": {"epochs": 1, "batch_size": 16}},
                   (ids, labels), lambda m: {"accuracy": 0.0})
    assert res.history.epochs and res.example_inputs.dtype == torch.int64
    with pytest.raises(DataError, match="dtype torch.bool"):
        compress(_TokenClassifier(), {}, (ids > 3, labels), lambda m: {"accuracy": 0.0})
    for small in (torch.int16, torch.int8):  # class indices of any integer dtype (refused as "not integer" before)
        res = compress(_TokenClassifier(), {"training": {"epochs": 1, "batch_size": 16}}, (ids, labels.to(small)),
                       lambda m: {"accuracy": 0.0})
        assert res.history.epochs
    with pytest.raises(DataError, match="labels have dtype torch.bool"):
        compress(_TokenClassifier(), {}, (ids, labels.bool()), lambda m: {"accuracy": 0.0})


def test_token_level_kd_ignores_padding_and_does_not_grow_with_length():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    base = kd_loss(s, t, 2.0, mask)
    s2 = s.clone()
    s2[1, 3:] += 100.0  # padding positions: any logits
    assert torch.allclose(kd_loss(s2, t, 2.0, mask), base)
    per_token = kd_loss(s[:1], t[:1], 2.0)
    doubled = kd_loss(torch.cat([s[:1], s[:1]], 1), torch.cat([t[:1], t[:1]], 1), 2.0)
    assert torch.allclose(per_token, doubled)  # a mean over tokens, not a sum
    assert kd_loss(s, s, 2.0, mask).abs() < 1e-6


def test_finalize_before_the_planned_end_names_what_is_not_done():
    model, session, opt = _start()
    x, y = _data()
    _train(model, session, opt, range(1), x, y)  # 4 of the 16 steps: LSQ starts at step 8
    with pytest.warns(UserWarning, match=r"finalize at step 4 of the 16.*quant_lsq \(not attached yet\).*"
                                         r"prune_unstructured \(not at its target\)"):
        session.finalize()


def test_empty_training_data_is_named():
    """An empty DataLoader ended in StopIteration, empty tensors in the sampler's ValueError."""
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(0, 12), torch.zeros(0).long()))
    for data, words in ((empty, "train_data yields no batches"), ((torch.randn(0, 12), torch.zeros(0).long()), "no samples")):
        with pytest.raises(DataError, match=words):
            compress(_mlp(), RECIPE, data, lambda m: {"accuracy": 0.0})


def test_prepare_errors_name_the_field():
    with pytest.raises(RecipeError, match="total_steps"):
        jointcompress.prepare(_mlp(), RECIPE)
    with pytest.raises(RecipeError, match="total_steps=2.5"):
        jointcompress.prepare(_mlp(), RECIPE, total_steps=2.5)
    with pytest.raises(RecipeError, match=r"got the path 'recipe.yaml'.*load_recipe\(path\)"):
        jointcompress.prepare(_mlp(), "recipe.yaml", total_steps=10)
    with pytest.raises(RecipeError, match="needs a teacher"):
        jointcompress.prepare(_mlp(), {"techniques": [{"type": "distill_kd"}]}, total_steps=10)
    with pytest.raises(DataError, match=r"logits have shape \(4, 2\) and the labels \(4, 3\)"):
        s = jointcompress.prepare(_mlp(), {}, total_steps=10)
        s.loss(torch.randn(4, 2), (torch.randn(4, 12), torch.zeros(4, 3, dtype=torch.long)))


def test_hidden_state_kd_on_dict_batches_averages_over_real_tokens():
    pytest.importorskip("transformers")
    from hf_helpers import tiny_bert

    from jointcompress.techniques.distill_kd import feature_loss

    teacher, student = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=0)
    ids = torch.randint(5, 60, (4, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1:, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1])}
    pair = {"student": "bert.encoder.layer.1", "teacher": "bert.encoder.layer.1"}
    recipe = {"techniques": [{"type": "distill_kd", "alpha": 0.5, "temperature": 1.0, "features": [pair]}]}
    session = jointcompress.prepare(student, recipe, total_steps=4, teacher=teacher,
                                    example_inputs={"input_ids": ids[:2], "attention_mask": mask[:2]})
    kd = session.techniques[0]
    terms = session.loss(student(**batch), batch)
    assert torch.equal(kd._positions(session.ctx), mask)
    s, t = kd.student_caps[0].value, kd.teacher_caps[0].value
    assert s.shape == (4, 8, 32)
    logits_part = 0.5 * kd_loss(session.ctx.outputs, session.ctx.batch_extra["teacher_logits"], 1.0, mask)
    masked = feature_loss(s, t, "mse", mask)
    assert torch.allclose(terms["distill"], logits_part + masked)
    assert not torch.allclose(masked, feature_loss(s, t, "mse"))  # padding really is left out


def test_the_sessions_optimizer_is_fused_where_the_device_has_the_kernel_else_multi_tensor():
    """The fused Adam updates each tensor in one pass (the multi-tensor one in about eight); a
    device or dtype without the fused kernel gets the multi-tensor optimizer, never an error."""
    from jointcompress.session.session import fused_or_foreach

    params = [nn.Parameter(torch.randn(4, 3))]
    opt = fused_or_foreach(torch.optim.Adam, [{"params": params}], lr=1e-3)
    assert opt.defaults["fused"] and not opt.defaults["foreach"]
    reference = torch.optim.Adam([p2 := nn.Parameter(params[0].detach().clone())], lr=1e-3, foreach=True)
    for p, o in ((params[0], opt), (p2, reference)):  # the same update to float rounding
        p.grad = torch.ones_like(p)
        o.step()
    assert torch.allclose(params[0], p2, atol=1e-7)

    class NoFused(torch.optim.Adam):
        def __init__(self, groups, fused=None, **options):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
            super().__init__(groups, **options)

    opt = fused_or_foreach(NoFused, [{"params": params}], lr=1e-3)
    assert opt.defaults["foreach"] and not opt.defaults["fused"]


def _loop_skipping(verb: str | None, x, y, recipe, steps: int = 6):
    """The documented loop with session.<verb>() left out (None: the whole loop); (model, warnings)."""
    import warnings

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    session = jointcompress.prepare(model, recipe, total_steps=steps)
    opt = torch.optim.Adam(session.param_groups())
    session.bind(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _plain_steps(session, model, opt, x, y, steps, left_out=verb)
    return model, [str(w.message) for w in caught]


def _plain_steps(session, model, opt, x, y, steps: int, left_out: str | None = None, skip_first: bool = False) -> None:
    """`steps` steps of the documented loop, with session.<left_out>() left out and, with `skip_first`, the
    first optimizer step skipped (as a loss scaler skips an overflow)."""
    for step in range(steps):
        terms = session.loss(model(x), (x, y))
        opt.zero_grad()
        session.backward(terms)
        if left_out != "before_step":
            session.before_step()
        if step > 0 or not skip_first:
            opt.step()
        if left_out != "after_step":
            session.after_step()


@pytest.mark.parametrize("verb, says", [
    # without after_step the schedule stays at step 0: masks never ramp and finalize bakes an uncompressed
    # model, silently; the second before_step at the same step says so, once
    ("after_step", "no session.after_step() between"),
    # without before_step the techniques never act on the gradients (a learned mask's own gradient, the
    # size budget's, the Fisher estimate's fold): after_step says so, once
    ("before_step", "no session.before_step() since the last after_step")])
def test_a_loop_leaving_out_a_step_verb_is_warned_once(verb, says):
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    y = x[:, :3].argmax(1)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5}]}
    for skipped, expected in ((None, 0), (verb, 1)):
        model, said = _loop_skipping(skipped, x, y, recipe)
        assert len([m for m in said if says in m]) == expected
        if verb == "after_step":  # what the warning is about
            assert float((model[0].weight == 0).float().mean()) == (0.0 if skipped else 0.5)


def test_a_nan_input_in_the_callers_loop_is_warned_and_finalize_says_the_model_is_broken():
    """A NaN input at one step of the caller's own loop made every weight NaN; finalize and save went on."""
    import warnings

    torch.manual_seed(0)
    x = torch.randn(32, 8)
    y = x[:, :3].argmax(1)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5}, {"type": "quant_lsq", "bits": 4}]}
    for nan_at, expected in ((None, 0), (5, 1)):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        session = jointcompress.prepare(model, recipe, total_steps=60)
        opt = torch.optim.Adam(session.param_groups())
        session.bind(opt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(60):
                xb = x.clone()
                if step == nan_at:
                    xb[0, 0] = float("nan")
                terms = session.loss(model(xb), (xb, y))
                opt.zero_grad()
                session.backward(terms)
                session.before_step()
                opt.step()
                session.after_step()
            said = [str(w.message) for w in caught if "were not finite at a step between" in str(w.message)]
            assert len(said) == expected
            if nan_at is not None:
                assert "loss term(s) task were not finite at a step between 0 and 50" in said[0]
            session.finalize(x[:2])
        said = [w for w in caught if "parameter(s) hold NaN or inf" in str(w.message)]
        assert len(said) == expected


@pytest.mark.parametrize("criterion", ["magnitude", "learned"])
def test_prepare_leaves_the_models_batchnorm_statistics_and_modes_alone(criterion):
    """Finding the output layers ran the model in train mode: BatchNorm counted a batch and moved its
    running mean before training started."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    model[4].eval()  # a frozen normalization inside a training model keeps its mode (tracing set it to train)
    before = copy.deepcopy(model.state_dict())
    jointcompress.prepare(model, {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "criterion": criterion}]},
                          total_steps=10, example_inputs=torch.randn(4, 3, 8, 8) + 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" in k or "batches" in k)
    assert model.training and model[1].training and not model[4].training


def test_outputs_without_logits_train_on_the_users_own_task_loss():
    """A model returning {"scores": ...} was refused with "no 'logits' ... or give the session a loss_fn and task
    loss of your own", and giving both was refused the same way: the logits were read unconditionally."""
    import torch.nn.functional as F

    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x):
            return {"scores": self.body(x)}

    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    own = lambda out, batch: F.cross_entropy(out["scores"], batch[1])  # noqa: E731
    model = Scores()
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, total_steps=2, loss_fn=own)
    terms = session.loss(model(x), (x, y))
    assert torch.allclose(terms["task"], own(model(x), (x, y)))
    teacher = Scores()
    model = copy.deepcopy(teacher)
    session = jointcompress.prepare(model, {"techniques": [{"type": "distill_kd"}]}, total_steps=2, loss_fn=own,
                                    teacher=teacher)
    with pytest.raises(DataError, match="no 'logits'; return the logits under 'logits' \\(distill_kd needs them\\)"):
        session.loss(model(x), (x, y))


def test_technique_parameters_an_unbound_optimizer_lacks_are_named_after_the_first_step():
    """An optimizer made from model.parameters() and never bound holds the LSQ step sizes (they live in the
    model's parametrizations) but not the mask scores: those never trained, and nothing said so (a technique
    attaching later was warned about, one attached at step 0 was not)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    recipe = {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "criterion": "learned", "end": 0.6},
                             {"type": "quant_lsq", "bits": 4}]}

    def run(bind: bool) -> list[str]:
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        session = jointcompress.prepare(model, recipe, total_steps=4, example_inputs=x[:2])
        opt = torch.optim.Adam(session.param_groups(lr=1e-2) if bind else model.parameters(), lr=1e-2)
        if bind:
            session.bind(opt)
        return _unbound_warnings(session, model, opt, x, y, steps=2)

    said = run(bind=False)
    assert len(said) == 1 and "prune_structured.masks" in said[0] and "log_step" not in said[0], said
    assert run(bind=True) == []


def test_a_skipped_first_step_does_not_read_as_an_optimizer_without_the_technique_parameters():
    """An fp16 loss scaler skips the steps whose gradients overflowed (often the first): nothing moves then, the
    technique parameters of an optimizer that holds them (made from session.param_groups, not bound) included."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    session = jointcompress.prepare(model, {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.6}]},
                                    total_steps=4, example_inputs=x[:2])
    opt = torch.optim.Adam(session.param_groups(lr=1e-2))  # holds the mask scores; not bound
    assert _unbound_warnings(session, model, opt, x, y, steps=3, skip_first=True) == []


def _unbound_warnings(session, model, opt, x, y, steps: int, skip_first: bool = False) -> list[str]:
    """Train `steps` steps in a plain loop (the first without its optimizer step: skipped, as a loss scaler
    skips an overflow); the warnings about technique parameters the optimizer step left unchanged."""
    import warnings

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _plain_steps(session, model, opt, x, y, steps, skip_first=skip_first)
    return [str(w.message) for w in said if "technique parameter" in str(w.message)]


def test_multi_label_targets_are_refused_as_soft_labels_and_real_soft_labels_train():
    """0/1 multi-label targets of the logits' shape were read as class probabilities: cross-entropy trained a
    softmax over them without a word (0.81 label accuracy where BCE reached 0.97)."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 8}]}, total_steps=2)
    x = torch.randn(6, 8)
    multi = (torch.rand(6, 4) > 0.5).float()
    with pytest.raises(DataError, match=r"rows sum to .* not 1 \(multi-label targets\?\); pass loss_fn=.*binary_cross"):
        session.loss(model(x), (x, multi))
    soft = torch.softmax(torch.randn(6, 4), -1)
    assert torch.isfinite(session.loss(model(x), (x, soft))["task"])


def test_a_tuple_of_several_output_tensors_says_which_is_read_as_the_logits():
    """(embedding, logits): the first tensor was read as the logits and the task term was cross-entropy on the
    embedding (labels 0..1 fit inside its 16 "classes"), without a word."""
    class EmbeddingFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(8, 16), nn.Linear(16, 2)

        def forward(self, x):
            h = self.body(x)
            return h, self.head(h)

    model = EmbeddingFirst()
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 8}]}, total_steps=2)
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
    with pytest.warns(UserWarning, match=r"a tuple of 2 tensors \(per sample \[16\], \[2\]\); the first is read as the "
                                         r"logits, and the others get no task loss and no distillation.*"
                                         r"distill_kd.features"):
        session.loss(model(x), (x, y))


def test_a_tuple_of_outputs_is_said_once_a_run_though_the_size_budget_measures_the_file():
    """Python's once-per-place memory is reset whenever a filter changes, which every measurement of the file does
    (catch_warnings around the trace): a two-headed model got the line at nearly every step (37 times in 12)."""
    import warnings

    from jointcompress.data import evaluator

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.aux = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 2)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.head(h), self.aux(h)

    torch.manual_seed(0)
    x, y = torch.randn(128, 8), torch.randint(0, 3, (128,))
    recipe = {"mode": "joint", "target": {"ratio": 4}, "training": {"epochs": 3, "batch_size": 16},
              "techniques": [{"type": "quant_lsq", "bits": 4}]}
    for _ in range(2):  # a second run says it again, once
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            jointcompress.compress(TwoHeads(), recipe, (x, y), evaluator(x[:32], y[:32]))
        assert sum("a tuple of 2 tensors" in str(w.message) for w in caught) == 1


def test_prepare_names_a_technique_by_its_place_in_the_recipe_given():
    """mode: joint under a size target drops prune_unstructured (the joint form): prepare() checked the rewritten
    recipe and named the user's techniques[1] as techniques[0]; compress() already checked the recipe as given."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    recipe = {"mode": "joint", "target": {"ratio": 4},
              "techniques": [{"type": "prune_unstructured"}, {"type": "quant_lsq", "layer_bits": {"fc9": 6}}]}
    with pytest.raises(RecipeError, match=r"techniques\[1\] \(quant_lsq\)"):
        jointcompress.prepare(model, recipe, total_steps=4)


def test_a_pair_whose_last_batch_would_hold_one_sample_drops_it_for_a_batchnorm_model():
    """BatchNorm cannot train on one sample: 321 rows at batch 32 crashed in torch at the last batch of every
    epoch ("Expected more than 1 value per channel"). The loader built for a pair drops that one sample then."""
    torch.manual_seed(0)
    x, y = torch.randn(33, 8), torch.randint(0, 3, (33,))
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    result = compress(model, {"techniques": [{"type": "quant_lsq", "bits": 8}], "training": {"epochs": 2, "batch_size": 16}},
                      (x, y), lambda m: {"accuracy": 0.0})
    assert result.history.epochs[-1]["step"] == 4  # 2 batches an epoch: 16 + 16, the 33rd sample left out
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    result = compress(plain, {"techniques": [{"type": "quant_lsq", "bits": 8}], "training": {"epochs": 2, "batch_size": 16}},
                      (x, y), lambda m: {"accuracy": 0.0})
    assert result.history.epochs[-1]["step"] == 6  # no BatchNorm: every sample, the last batch of one included


def test_a_loader_whose_len_is_not_its_batches_is_said_once():
    """The run is placed on len(loader) batches an epoch: an IterableDataset whose __len__ counts another number (or
    that every worker yields whole) ended after another number of epochs than asked, without a word."""
    import warnings

    from torch.utils.data import DataLoader, IterableDataset

    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))

    class Rows(IterableDataset):
        def __init__(self, claimed):
            self.claimed = claimed

        def __iter__(self):
            return iter(zip(x, y))

        def __len__(self):
            return self.claimed

    for claimed, words in ((128, "4 batches where its len() gives 8"), (32, "more batches than the 2 its len() gives")):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            compress(nn.Linear(8, 3), {"techniques": [{"type": "quant_lsq", "bits": 8}], "training": {"epochs": 2}},
                     DataLoader(Rows(claimed), batch_size=16), lambda m: {"accuracy": 0.0})
        lengths = [str(w.message) for w in said if "an epoch yielded" in str(w.message)]
        assert len(lengths) == 1 and words in lengths[0], lengths


def test_the_size_a_session_reports_after_finalize_is_read_as_finalize_began():
    """metrics() read first after finalize (the quantizers gone) reported 0 bytes; it reports what the
    budget estimated as finalize began, the same as a session whose metrics were read before."""
    from session_helpers import train_in_own_loop

    recipe = {"mode": "joint", "target": {"ratio": 10},
              "techniques": [{"type": "prune_unstructured"}, {"type": "quant_lsq", "bits": 4}]}
    x, y = torch.randn(64, 20), torch.randint(0, 2, (64,))

    def session():
        torch.manual_seed(0)
        return train_in_own_loop(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2)), recipe, x, y, steps=4)

    read_before, read_after = session(), session()
    before = read_before.metrics()["size_budget.size_bytes"]
    read_before.finalize()
    read_after.finalize()
    assert before > 0 and read_after.metrics()["size_budget.size_bytes"] == before
    assert read_before.metrics()["size_budget.size_bytes"] == before


def _cnn_stopped_early(criterion: str, steps: int = 40):
    """A CNN with prune_structured (ramp to step 80 of 100) trained by a user's loop that stops at `steps`."""
    import jointcompress

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    recipe = {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.8, "criterion": criterion}]}
    session = jointcompress.prepare(model, recipe, total_steps=100, example_inputs=x[:8])
    opt = torch.optim.Adam(session.param_groups(lr=1e-3))
    session.bind(opt)
    for step in range(steps):
        xb, yb = x[step % 8 * 8:][:8], y[step % 8 * 8:][:8]
        terms = session.loss(model(xb), (xb, yb))
        opt.zero_grad()
        session.backward(terms)
        session.before_step()
        opt.step()
        session.after_step()
    return model.eval(), session, x[:16]


def test_learned_channel_masks_finalized_mid_ramp_say_how_far_the_outputs_moved():
    """A loop stopped at step 40 of a ramp to 80: finalize made the soft masks binary and the logits moved, which
    the parity check, taken after the masks were made binary, did not see; nothing was said but "not at its
    target"."""
    model, session, x = _cnn_stopped_early("learned")
    with torch.no_grad():
        masked = model(x)
    with pytest.warns(UserWarning, match=r"learned channel masks were still soft .* the outputs moved by"):
        session.finalize()
    with torch.no_grad():
        assert float((model.eval()(x) - masked).abs().max()) > 1e-3  # what the warning is about


def test_magnitude_channel_masks_finalized_before_their_ramp_ends_are_said():
    """At step 40 of a ramp to 80 the magnitude masks held fewer channels' zeros than asked, within at_target's
    rounding slack: finalize gave a larger model than asked without a word."""
    model, session, x = _cnn_stopped_early("magnitude")
    with torch.no_grad():
        masked = model(x)
    with pytest.warns(UserWarning, match=r"finalize at step 40 of the 100.*prune_structured \(its ramp ends at step 80\)"):
        session.finalize()
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), masked, atol=1e-5)  # binary masks: the outputs stay


def test_bind_leaves_out_the_weights_the_callers_optimizer_left_out_and_adds_weights_made_later():
    """bind() added every model weight the optimizer lacked: a loop fine-tuning only the head trained the whole
    model, and weights given to a second optimizer were stepped by both. Technique parameters are still added,
    and a weight made after bind (a layer the session rebuilt) still joins."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 2))
    x, y = torch.randn(32, 20), torch.randint(0, 2, (32,))
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, total_steps=4)
    head_only = torch.optim.SGD(model[2].parameters(), lr=0.1)
    session.bind(head_only)
    held = {id(p) for g in head_only.param_groups for p in g["params"]}
    frozen = [model[0].parametrizations.weight.original, model[0].bias]
    assert not any(id(p) in held for p in frozen)
    assert all(id(q.log_step) in held for q in (model[0].parametrizations.weight[0], model[2].parametrizations.weight[0]))
    before = [p.detach().clone() for p in frozen]
    terms = session.loss(model(x), (x, y))
    head_only.zero_grad()
    session.backward(terms)
    session.before_step()
    head_only.step()
    session.after_step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(frozen, before))
    grown = nn.Parameter(torch.zeros(3))  # a parameter the model gains after bind, as a rebuilt layer's
    model[0].register_parameter("extra", grown)
    session._add_missing_groups()
    assert any(p is grown for g in head_only.param_groups for p in g["params"])


@pytest.mark.parametrize("recipe", [RECIPE, {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5},
                                                            {"type": "quant_lsq", "bits": 4, "zero_level": True}]}])
def test_a_snapshot_of_the_model_right_after_a_step_is_taken_and_outlives_finalize(recipe):
    """copy.deepcopy(model) after optimizer.step() (a best-model or EMA snapshot) failed: the quantizers and masks
    kept their last forward's graph tensors ("Only Tensors created explicitly by the user ..."); and a snapshot
    taken before finalize lost its weight ("no attribute 'weight'") when finalize removed the parametrizations from
    the class the snapshot shares."""
    x, y = _data()
    model = _mlp()
    session = jointcompress.prepare(model, recipe, total_steps=4)
    opt = torch.optim.Adam(session.param_groups(lr=1e-2))
    session.bind(opt)
    snapshots = []
    _train(model, session, opt, range(1), x, y, after_step=lambda: snapshots.append(copy.deepcopy(model)))
    with torch.no_grad():
        before = snapshots[-1](x)
        assert torch.equal(before, model(x))  # the last snapshot is the model as it is
    session.finalize()
    with torch.no_grad():
        assert torch.equal(snapshots[-1](x), before)  # still the masked model it copied
        assert torch.allclose(model(x), before, atol=1e-6)

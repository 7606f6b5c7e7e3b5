"""Misuse of a session from the caller's loop is refused or named, not run silently: a CyclicLR
bound while a technique attaches later, the optimizer's own weight decay, finalize twice, steps
after finalize, a forgotten bind, outputs without grad, a resume into another recipe or
total_steps, labels outside the classes, a flat (ids, mask, labels) batch."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import jointcompress
from jointcompress import JointCompressError, RecipeError

LATE_LSQ = {"techniques": [{"type": "quant_lsq", "bits": 4, "start": 0.3}]}  # attaches at step 6 of 20
PRUNE_LSQ = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.7, "end": 0.6},
                            {"type": "quant_lsq", "bits": 4, "start": 0.3}]}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 2))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 20, generator=g)
    return x, (x[:, :5].sum(1) > 0).long()


def _session(recipe=PRUNE_LSQ, steps=8, lr=1e-3, bind=True):
    model = _mlp()
    session = jointcompress.prepare(model, recipe, total_steps=steps)
    opt = torch.optim.Adam(session.param_groups(lr=lr))
    if bind:
        session.bind(opt)
    return model, session, opt


def _two_micro_batches(session, model, x, y):
    """One step's backward in two micro-batches, each term halved, as gradient accumulation takes it."""
    for xm, ym in zip(x.chunk(2), y.chunk(2)):
        session.backward({k: t / 2 for k, t in session.loss(model(xm), (xm, ym)).items()})


def _step(model, session, opt, sched=None, optimizer_last=False):
    """One step of the documented loop; `optimizer_last`: optimizer.step() after session.after_step() (misuse)."""
    x, y = _data()
    terms = session.loss(model(x), (x, y))
    opt.zero_grad()
    session.backward(terms)
    session.before_step()
    if optimizer_last:
        session.after_step()
        opt.step()
    else:
        opt.step()
        session.after_step()
    if sched is not None:
        sched.step()


@pytest.mark.parametrize("cycle_momentum", [True, False])
def test_cycliclr_bound_keeps_a_later_group_at_its_constant_lr_ratio(cycle_momentum):
    """(a) with cycle_momentum the step LSQ attached stopped with torch's "zip() argument 2 is shorter";
    (b) the new group ran at 10x the weights' rate, scaled from the bottom of the cycle."""
    model = _mlp()
    session = jointcompress.prepare(model, LATE_LSQ, total_steps=20)
    opt = torch.optim.SGD(session.param_groups(lr=3e-3), momentum=0.9)  # quant_steps: step_lr 1e-3, a third
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-4, max_lr=3e-3, step_size_up=5,
                                              cycle_momentum=cycle_momentum)
    session.bind(opt, sched)
    for _ in range(20):
        _step(model, session, opt, sched)
        if len(opt.param_groups) > 1:
            weights, steps = opt.param_groups
            assert steps["lr"] == pytest.approx(weights["lr"] / 3)
            assert steps["momentum"] == pytest.approx(weights["momentum"])
    assert [g["name"] for g in opt.param_groups] == ["weights", "quant_steps"]


def test_the_weights_group_leaves_weight_decay_to_the_optimizer():
    model = _mlp()
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, total_steps=4)
    opt = torch.optim.AdamW(session.param_groups(lr=1e-3), weight_decay=0.1)
    assert [(g["name"], g["weight_decay"]) for g in opt.param_groups] == [("weights", 0.1), ("quant_steps", 0.0)]
    # an explicit setting still wins: the argument, or the recipe's training.weight_decay
    assert session.param_groups(weight_decay=0.3)[0]["weight_decay"] == 0.3
    explicit = jointcompress.prepare(_mlp(), {"training": {"weight_decay": 0.05}, "techniques": [{"type": "quant_lsq", "bits": 4}]},
                                     total_steps=4)
    assert [g["weight_decay"] for g in explicit.param_groups()] == [0.05, 0.0]


def test_finalize_twice_returns_the_first_spec():
    model, session, opt = _session()
    for _ in range(8):
        _step(model, session, opt)
    first = session.finalize()
    assert set(first.layers) == {"0", "2"}
    assert session.finalize() is first  # was an empty spec (the model saved as dense fp32)


@pytest.mark.parametrize("verb", ["backward", "before_step", "after_step", "state_dict"])
def test_the_loop_verbs_refuse_to_run_after_finalize(verb):
    model, session, opt = _session()
    for _ in range(8):
        _step(model, session, opt)
    session.finalize()
    x, y = _data()
    call = {"backward": lambda: session.backward(session.loss(model(x), (x, y))), "before_step": session.before_step,
            "after_step": session.after_step, "state_dict": session.state_dict}[verb]
    with pytest.raises(JointCompressError, match=rf"session\.{verb}\(\) after session\.finalize\(\).*prepare a new session"):
        call()


def test_a_technique_attaching_with_no_optimizer_bound_is_named_once():
    model, session, opt = _session(steps=20, bind=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(20):
            _step(model, session, opt)
    named = [w for w in caught if "session.bind(optimizer)" in str(w.message)]
    assert len(named) == 1 and "quant_steps (quant_lsq) attached at step 6" in str(named[0].message)
    with warnings.catch_warnings():  # bound: nothing said
        warnings.simplefilter("error")
        model, session, opt = _session(steps=20)
        for _ in range(20):
            _step(model, session, opt)


def test_outputs_without_grad_are_refused_by_backward():
    model, session, opt = _session()
    x, y = _data()
    with torch.no_grad():
        outputs = model(x)
    terms = session.loss(outputs, (x, y))
    with pytest.raises(JointCompressError, match=r"none of the loss terms \(task\) requires grad.*no_grad"):
        session.backward(terms)


def test_a_model_with_every_parameter_frozen_is_said_to_be_frozen_not_run_under_no_grad():
    """Every parameter frozen and the quantizer not started: the refusal blamed torch.no_grad(), which the loop never
    used, and compress() named session.backward, which its user never called."""
    from jointcompress import compress

    torch.manual_seed(0)
    x, y = _data()
    model = _mlp().requires_grad_(False)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4, "start": 0.3}],
              "training": {"epochs": 1, "batch_size": 16}}
    with pytest.raises(JointCompressError, match=r"every parameter of the model is frozen \(requires_grad=False\)") as err:
        compress(model, recipe, (x, y), lambda m: 0.0)
    assert "no_grad" not in str(err.value) and "session.backward" not in str(err.value)


def _checkpoint():
    model, session, opt = _session(steps=20)
    for _ in range(10):
        _step(model, session, opt)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "session": session.state_dict()}


def test_resume_into_another_recipe_or_total_steps_is_refused_by_name():
    ck = _checkpoint()
    other = {"techniques": [{**PRUNE_LSQ["techniques"][0], "sparsity": 0.5}, PRUNE_LSQ["techniques"][1]]}
    _, session, _ = _session(other, steps=20)
    with pytest.raises(RecipeError, match=r"different recipe \(techniques\[0\]\.sparsity: 0\.7 in the checkpoint, 0\.5 now\)"):
        session.load_state_dict(ck["session"])
    for steps in (12, 40):
        _, session, _ = _session(steps=steps)
        with pytest.raises(JointCompressError, match=rf"prepared with total_steps=20, this one with total_steps={steps}"):
            session.load_state_dict(ck["session"])
    # a joint recipe under another size target: named by the field the user wrote, not the bytes of the size_budget
    # the joint form adds (techniques[2].target_bytes, where the user's techniques[2] is distill_kd)
    def joint(kb):
        return jointcompress.prepare(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), {
            "mode": "joint", "target": {"size_kb": kb}, "techniques": [
                {"type": "prune_unstructured"}, {"type": "quant_lsq", "bits": 4}, {"type": "distill_kd"}]},
            total_steps=20, teacher=nn.Linear(64, 10), example_inputs=torch.randn(2, 64))
    with pytest.raises(RecipeError, match=r"different recipe \(target\.size_kb: 1\.5 in the checkpoint, 2\.0 now\)"):
        joint(2.0).load_state_dict(joint(1.5).state_dict())
    model, session, opt = _session(steps=20)  # the same recipe and steps: resumes
    session.load_state_dict(ck["session"])
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    assert session.step == 10


def test_a_prepared_model_loads_what_fits_when_asked_to():
    """A load pre-hook that named the resume order also refused strict=False loads (torch hands every pre-hook
    strict=True), which is how transformers' Trainer resumes: the model's own load stays torch's."""
    ck = _checkpoint()
    model, session, opt = _session(steps=20)
    missing, unexpected = model.load_state_dict(ck["model"], strict=False)
    assert unexpected and all(".parametrizations." in k for k in unexpected)


def test_labels_outside_the_models_classes_are_named_not_an_index_error():
    from jointcompress.errors import DataError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, total_steps=4)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 5, 1, 0])
    with pytest.raises(DataError, match=r"labels run from 0 to 5, but the model has 3 outputs"):
        session.loss(model(x), (x, y))


def test_a_flat_ids_mask_labels_batch_is_named():
    """TensorDataset(input_ids, attention_mask, labels) yields three tensors, read as (x, y, index): the mask
    became the labels and the labels the teacher cache's index, silently."""
    from jointcompress.session.outputs import split_batch

    ids, mask, labels = torch.randint(2, 50, (4, 7)), torch.ones(4, 7, dtype=torch.long), torch.tensor([0, 1, 1, 0])
    with pytest.warns(UserWarning, match=r"looks like \(input_ids, attention_mask, labels\)"):
        split_batch((ids, mask, labels))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split_batch((torch.randn(4, 7), labels, torch.arange(4)))  # (x, y, index) as documented: silent
        split_batch(((ids, mask), labels))


def test_a_session_checkpoint_from_before_a_training_field_loads():
    """training.greater_is_better was added later: a session checkpoint whose recipe lacks it was refused as
    made with a different recipe (as run checkpoints once were for training.keep)."""
    ck = _checkpoint()
    del ck["session"]["identity"]["recipe"]["training"]["greater_is_better"]
    _, session, _ = _session(steps=20)
    session.load_state_dict(ck["session"])


def test_a_teacher_with_other_classes_is_named_at_the_first_step_of_the_callers_loop():
    """compress() checks the teacher on a batch before training; prepare() without example_inputs (the
    documented loop) met it inside F.kl_div, whose message named neither the teacher nor the fix."""
    from jointcompress import DataError

    x, y = _data()
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))
    model = _mlp()
    recipe = {"techniques": [{"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]}
    session = jointcompress.prepare(model, recipe, total_steps=4, teacher=teacher)
    with pytest.raises(DataError, match=r"teacher: its logits have shape \(32, 5\) and the model's \(32, 2\)"):
        session.loss(model(x), (x, y))


@pytest.mark.parametrize("recipe", [
    {"techniques": [{"type": "quant_lsq", "bits": 4}, {"type": "distill_kd"}]},
    {"mode": "joint", "target": {"ratio": 10}, "techniques": [{"type": "quant_lsq", "bits": 4}]},
    {"techniques": [{"type": "prune_structured", "sparsity": 0.5}]},
], ids=["distill", "joint_target", "structured"])
def test_example_inputs_the_model_cannot_take_are_named_by_prepare(recipe):
    """compress() runs the model on a batch before anything else; prepare() met wrong inputs inside the
    teacher check or the channel trace (torch's message), or not at all under a joint size target."""
    from jointcompress import DataError

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(DataError, match=r"example_inputs: the model cannot run on a batch of shape \(2, 1, 16, 16\)"):
        jointcompress.prepare(model, recipe, total_steps=10, teacher=teacher, example_inputs=torch.randn(2, 1, 16, 16))


def test_prepare_leaves_a_backbone_the_user_froze_in_eval_mode():
    """Its check of example_inputs put the model back with model.train(was), which set every module to the
    top one's mode: a frozen backbone's BatchNorm then moved its statistics at every step of the caller's loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU()), nn.Linear(16, 2))
    model.train()
    model[0].eval()
    x, _ = _data()
    jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, total_steps=4, example_inputs=x[:2])
    assert model.training and model[1].training and not model[0].training and not model[0][1].training


def test_prepare_names_a_model_wrapped_in_distributed_data_parallel():
    """compress() unwraps it and calls the model itself; in your own loop the wrapper is what gets called, and
    its reducer failed with torch's advice to set find_unused_parameters, which is not the fix."""
    from torch.nn.parallel import DistributedDataParallel

    wrapped = DistributedDataParallel.__new__(DistributedDataParallel)  # the type is what is checked: no group needed
    with pytest.raises(RecipeError, match=r"wrapped in DistributedDataParallel; pass the model itself \(model.module\)"):
        jointcompress.prepare(wrapped, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, total_steps=4)


@pytest.mark.parametrize("recipe", [PRUNE_LSQ, {"mode": "joint", "target": {"ratio": 10},
                                               "techniques": [{"type": "quant_lsq", "bits": 4}]}],
                         ids=["masks", "size_target"])
def test_a_loss_of_another_model_is_refused_at_the_first_backward(recipe):
    """A loop that trained a copy of the prepared model (or a Trainer given one) ran every step and finalize baked the
    session's model, untrained; under a size target the size term's gradients still reached the prepared model, so
    no check of its gradients saw anything amiss, and it came out compressed on its size alone."""
    import copy

    from jointcompress.errors import TrainingError

    model, session, opt = _session(recipe)
    other = copy.deepcopy(_mlp())
    x, y = _data()
    terms = session.loss(other(x), (x, y))
    with pytest.raises(TrainingError, match=r"the loss terms task do not depend on any weight of the model prepare"):
        session.backward(terms)


def test_the_first_backward_check_sees_through_parametrizations_and_not_through_reentrant_checkpoints():
    """The check walks the graph: a masked, quantized weight reaches its `original` parameter; a reentrant
    activation checkpoint (transformers' gradient_checkpointing) hides its segment's weights, and is let through."""
    from torch.utils.checkpoint import checkpoint

    from jointcompress.session.guards import reaches_parameters

    model, session, opt = _session()
    x, y = _data()
    params = [p for p in model.parameters() if p.requires_grad]
    assert any("original" in n for n, _ in model.named_parameters())
    assert reaches_parameters(model(x).sum(), params) is True
    assert reaches_parameters(_mlp()(x).sum(), params) is False
    hidden = checkpoint(model, x.requires_grad_(), use_reentrant=True).sum()
    assert reaches_parameters(hidden, params) is None
    _step(model, session, opt)  # the documented loop passes the check


def test_a_plain_loss_backward_is_named_and_the_step_still_runs():
    """loss.backward() in place of session.backward skipped the coordination (and under torchrun the ranks'
    averaging) silently."""
    model, session, opt = _session({**PRUNE_LSQ, "coordination": {"strategy": "pcgrad"}})
    x, y = _data()
    terms = session.loss(model(x), (x, y))
    opt.zero_grad()
    sum(terms.values()).backward()
    with pytest.warns(RuntimeWarning, match=r"no session.backward\(terms\) at this step.*'pcgrad'"):
        session.before_step()
    opt.step()
    session.after_step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented loop says nothing
        _step(model, session, opt)


def test_a_finalized_session_refuses_a_state_to_load():
    model, session, opt = _session()
    for _ in range(2):
        _step(model, session, opt)
    state = session.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # finalize before the planned end says so
        session.finalize()
    with pytest.raises(JointCompressError, match=r"session.load_state_dict\(\) after session.finalize\(\)"):
        session.load_state_dict(state)


def test_step_sizes_in_a_decayed_group_of_the_callers_optimizer_are_named():
    """An optimizer made from model.parameters() holds LSQ's step sizes (its parametrizations live in the model), and
    its weight decay pulled them toward a step of 1, against the documented "step sizes never decay"."""
    model = _mlp()
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, total_steps=4)
    with pytest.warns(UserWarning, match=r"the optimizer decays 2 technique parameter\(s\) \(.*log_step.*\) as weights"):
        session.bind(torch.optim.AdamW(model.parameters(), weight_decay=0.1))
    model = _mlp()
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, total_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session.bind(torch.optim.AdamW(session.param_groups(lr=1e-3), weight_decay=0.1))


def test_token_labels_that_are_the_input_ids_are_said_with_the_shift():
    """(ids, ids) batches, as Hugging Face users pass labels to a model that shifts them itself, trained an unshifted
    cross-entropy: a causal LM learned to repeat its input token, without a word. Said, not refused: a model that
    shifts inside (causal padding) is trained that way."""
    torch.manual_seed(0)
    lm = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))
    ids = torch.randint(0, 50, (4, 12))
    session = jointcompress.prepare(lm, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, total_steps=2)
    labels = ids.masked_fill(torch.arange(12) >= 10, -100)  # padding ignored, the rest the inputs
    for y in (ids, labels):
        with pytest.warns(UserWarning, match=r"are the input token ids themselves.*shift them yourself: \(ids\[:, :-1\]"):
            assert torch.isfinite(session.loss(lm(ids), (ids, y))["task"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shifted = session.loss(lm(ids[:, :-1]), (ids[:, :-1], ids[:, 1:]))
    assert torch.isfinite(shifted["task"])


def test_after_step_called_before_before_step_is_said_once_not_as_a_missing_backward():
    """A loop that called after_step, then optimizer.step and before_step was told so, and at the next step also told
    it had no session.backward, which it had: the check read the step after_step had already advanced."""
    model, session, opt = _session(PRUNE_LSQ, steps=6)
    x, y = _data()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(4):
            terms = session.loss(model(x), (x, y))
            opt.zero_grad()
            session.backward(terms)
            session.after_step()
            opt.step()
            session.before_step()
    messages = [str(w.message) for w in said]
    assert len([m for m in messages if "no session.before_step() since the last after_step" in m]) == 1, messages
    assert not [m for m in messages if "no session.backward(terms)" in m], messages


@pytest.mark.parametrize("teacher_kind, said", [("bf16", "same dtype"), ("wider", "shapes cannot be multiplied")])
def test_a_teacher_that_cannot_take_the_first_batch_is_named_without_example_inputs(teacher_kind, said):
    """prepare() without example_inputs (docs/your-model.md's loop) checks no teacher before the first batch: a bf16
    teacher or one made for 30 features ended in a matmul traceback from inside the session's distillation."""
    from jointcompress.errors import DataError

    torch.manual_seed(0)
    x = torch.randn(64, 20)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    teacher = (nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2)).to(torch.bfloat16) if teacher_kind == "bf16"
               else nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2)))
    session = jointcompress.prepare(model, {"techniques": [{"type": "distill_kd", "temperature": 2, "alpha": 0.5}]},
                                    total_steps=4, teacher=teacher)
    with pytest.raises(DataError, match=rf"teacher: it cannot run on the model's inputs .*{said}.*same input size"):
        session.loss(model(x), (x, y))


@pytest.mark.parametrize("settle_first, strategy, said", [(False, "pcgrad", True), (True, "pcgrad", False),
                                                          (False, "none", False)])
def test_gradients_clipped_before_the_micro_batches_settle_are_said(settle_first, strategy, said):
    """Clipped between the last micro-batch's backward and before_step, without settle_gradients first, PCGrad's
    step took an update that was neither the clipped nor the resolved one (3.6e-4 off), without a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    recipe = {"mode": "joint", "target": {"ratio": 4}, "techniques": [{"type": "quant_lsq", "bits": 4}],
              "coordination": {"strategy": strategy, "every": 1}}
    session = jointcompress.prepare(model, recipe, total_steps=2, example_inputs=x[:2])
    optimizer = torch.optim.SGD(session.param_groups(lr=0.1), lr=0.1)
    session.bind(optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            optimizer.zero_grad()
            _two_micro_batches(session, model, x, y)
            if settle_first:
                session.settle_gradients()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            session.before_step()
            optimizer.step()
            session.after_step()
    changed = [w for w in caught if "the gradients changed between the last session.backward()" in str(w.message)]
    assert len(changed) == int(said), [str(w.message) for w in caught]


def test_a_model_wrapped_in_distributed_data_parallel_after_prepare_is_refused_at_its_call(tmp_path):
    """prepare() refuses a wrapper it is given; one added after it went unseen: DDP's reducer failed with advice on
    find_unused_parameters, and with that flag the gradients were averaged twice. The model's own call names it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 2))
    x, _ = _data()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, total_steps=4,
                                        distributed=False)
        model(x[:2])  # the model itself: no refusal
        wrapped = DistributedDataParallel(session.model)
        with pytest.raises(RecipeError, match=r"called through DistributedDataParallel, wrapped after prepare\(\); "
                                              r"call the model itself \(model\.module\)"):
            wrapped(x[:2])
        session.finish()  # the guard goes with the session's other hooks
        wrapped(x[:2])
    finally:
        dist.destroy_process_group()


def test_terms_that_are_not_the_dict_of_scalar_tensors_are_named():
    """session.backward(loss) failed in torch's sparse Tensor.values(), a per-sample task_loss inside autograd
    ("grad can be implicitly created only for scalar outputs"), and loss.item() in the coordinator."""
    from jointcompress.errors import DataError, TrainingError

    model, session, opt = _session()
    x, y = _data()
    loss = nn.functional.cross_entropy(model(x), y)
    with pytest.raises(TrainingError, match="the dict of named terms session.loss returns, not Tensor"):
        session.backward(loss)
    with pytest.raises(DataError, match=r"task_loss=...\) got a tensor of shape \(32,\)"):
        session.loss(model(x), (x, y), task_loss=nn.functional.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(DataError, match=r"task_loss=...\) got float"):
        session.loss(model(x), (x, y), task_loss=loss.item())
    terms = session.loss(model(x), (x, y))
    with pytest.raises(TrainingError, match="the term 'zero' is float"):
        session.backward({**terms, "zero": 0.0})


def test_an_evaluation_between_the_forward_and_the_loss_keeps_the_quantizers_term():
    """quant_lsq's regularization read the last forward's weights: a torch.no_grad() evaluation between the
    training forward and session.loss dropped the "quant" term of that step, silently."""
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5},  # the quantizer reads the masked weight
                             {"type": "quant_lsq", "bits": 4, "regularization": 0.1}]}
    x, y = _data()
    terms = {}
    for evaluate in (False, True):
        model, session, opt = _session(recipe)
        outputs = model(x)
        if evaluate:
            with torch.no_grad():
                model(x[:4])
        terms[evaluate] = {k: float(v.detach()) for k, v in session.loss(outputs, (x, y)).items()}
    assert terms[True] == terms[False] and terms[True]["quant"] > 0


def test_steps_past_total_steps_are_said_once():
    model, session, opt = _session(steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            _step(model, session, opt)
    said = [str(w.message) for w in caught if "prepared with total_steps=3" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("session: step 4 ")


def test_save_names_a_missing_spec_and_a_model_not_finalized(tmp_path):
    from jointcompress.artifact import save
    from jointcompress.errors import ArtifactError

    model, session, opt = _session(steps=2)
    for _ in range(2):
        _step(model, session, opt)
    with pytest.raises(ArtifactError, match="spec is NoneType, not the CompressionSpec finalize returns"):
        save(model, None, tmp_path / "a")
    before = copy.deepcopy(model)
    spec = session.finalize()
    with pytest.raises(ArtifactError, match=r"2 layers \(0, 2\) still carry their masks or quantizers"):
        save(before, spec, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    save(model, spec, tmp_path / "c")


def test_gradients_changed_before_settling_are_said_once_a_run_across_a_technique_attaching():
    """The warning is said once a run; the coordinator the session makes again when a technique attaches (here LSQ
    at half the run) said it a second time."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 4, "start": 0.5}, {"type": "distill_kd", "alpha": 0.5}],
              "coordination": {"strategy": "pcgrad", "every": 1, "accuracy_as_one": False}}  # two terms, resolved by PCGrad
    session = jointcompress.prepare(model, recipe, total_steps=4, teacher=copy.deepcopy(model))
    optimizer = torch.optim.SGD(session.param_groups(lr=0.1), lr=0.1)
    session.bind(optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            optimizer.zero_grad()
            _two_micro_batches(session, model, x, y)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # without settle_gradients first
            session.before_step()
            optimizer.step()
            session.after_step()
    assert sum("the gradients changed between the last session.backward()" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("order", ["right", "optimizer_last"])
def test_an_optimizer_step_after_after_step_is_said_once(order):
    """before_step, after_step, then optimizer.step(): the step ended (its size reading, the next step's masks and
    freezes) on the weights before the update, with no word. A bound optimizer's post-hook says it once."""
    model, session, opt = _session(PRUNE_LSQ, steps=6)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(4):
            _step(model, session, opt, optimizer_last=order == "optimizer_last")
    late = [str(w.message) for w in said if "optimizer.step() after session.after_step()" in str(w.message)]
    assert len(late) == (1 if order == "optimizer_last" else 0), late
    assert session.step == 4


def test_a_checkpoint_loaded_in_the_wrong_order_names_the_order():
    """model.load_state_dict before session.load_state_dict ended in torch's raw list of missing and unexpected
    parametrizations keys (now refused by name; said where strict=False goes on); optimizer.load_state_dict before it in "a different number of
    groups" (now refused by name)."""
    from jointcompress.errors import TrainingError

    model, session, opt = _session(PRUNE_LSQ, steps=8)
    for _ in range(4):  # past quant_lsq's start: its quantizers hold keys a fresh model lacks
        _step(model, session, opt)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "session": session.state_dict()}
    model, session, opt = _session(PRUNE_LSQ, steps=8)
    first = r"model.load_state_dict: .*call session.load_state_dict\(state\) first"
    with pytest.raises(TrainingError, match=first):  # torch's raw key lists before (the order only in a warning)
        model.load_state_dict(state["model"])
    with pytest.warns(RuntimeWarning, match=first):  # strict=False goes on (the Trainer's resume), what it skipped said
        model.load_state_dict(state["model"], strict=False)
    model, session, opt = _session(PRUNE_LSQ, steps=8)
    with pytest.raises(TrainingError, match=r"optimizer.load_state_dict: .* parameter groups .*session.load_state_dict"):
        opt.load_state_dict(state["optimizer"])
    session.load_state_dict(state["session"])
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    x = _data()[0]
    assert session.step == 4 and torch.equal(model(x), model(x))


def test_the_same_terms_given_to_backward_twice_are_refused():
    """With two terms on a measured step the coordination keeps the graph, so a second session.backward of the same
    terms (a copied line) added every gradient again, the update twice as large, with no word."""
    from jointcompress.errors import TrainingError

    model, session, opt = _session({"techniques": [{"type": "quant_lsq", "bits": 4}]}, steps=4)
    x, y = _data()
    terms = session.loss(model(x), (x, y))
    terms = {**terms, "extra": 0.1 * model[0].weight.square().sum()}  # two terms: the measured step keeps the graph
    opt.zero_grad()
    session.backward(terms)
    with pytest.raises(TrainingError, match=r"session.backward at step 0: these terms went through backward already"):
        session.backward(terms)
    session.backward(session.loss(model(x), (x, y)))  # a new micro-batch's own terms: accumulated, as asked


def test_before_step_before_any_backward_is_refused_without_a_contrary_warning():
    """before_step with no backward at all raised the error and, before it, warned that a plain loss.backward()
    skipped the coordination, which had not run either."""
    from jointcompress.errors import TrainingError

    model, session, opt = _session(steps=4)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with pytest.raises(TrainingError, match="before_step ran before session.backward"):
            session.before_step()
    assert not [str(w.message) for w in said if "plain loss.backward()" in str(w.message)]


def test_terms_made_before_after_step_moved_the_session_are_refused_by_order():
    """after_step between session.loss and its backward (a loop in the wrong order) moves the masks and quantizers in
    place, and torch's backward failed nine frames deep on a tensor "modified by an inplace operation"; refused with the
    order named, and the next step's own terms still train."""
    from jointcompress.errors import TrainingError

    model, session, opt = _session(steps=8)
    x, y = _data()
    terms = session.loss(model(x), (x, y))
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # after_step with no before_step: warned, as it should be
        session.after_step()
    with pytest.raises(TrainingError, match=r"made by session.loss at step 0.*loss, backward, before_step"):
        session.backward(terms)
    session.backward(session.loss(model(x), (x, y)))  # step 1's own terms
    session.before_step()
    opt.step()
    session.after_step()
    assert session.step == 2

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jointcompress import RecipeError, compress
from jointcompress.techniques.distill_kd import hinton_loss, kd_loss


def test_kd_loss_equals_hand_computation():
    torch.manual_seed(0)
    s, t, T = torch.randn(5, 7), torch.randn(5, 7), 3.0
    p = torch.softmax(t / T, -1)
    q = torch.softmax(s / T, -1)
    hand = (p * (p.log() - q.log())).sum(-1).mean() * T * T  # KL(p || q), batchmean, T^2
    assert math.isclose(float(kd_loss(s, t, T)), float(hand), rel_tol=1e-5)
    y = torch.randint(0, 7, (5,))
    full = hinton_loss(s, t, y, T, alpha=0.3)
    assert math.isclose(float(full), float(0.3 * hand + 0.7 * F.cross_entropy(s, y)), rel_tol=1e-5)


def test_kd_loss_is_zero_when_student_equals_teacher_with_alpha_one():
    t = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    assert abs(float(hinton_loss(t.clone(), t, y, 4.0, alpha=1.0))) < 1e-6


def test_kd_gradient_reaches_the_student_only():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    kd_loss(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None


def test_distillation_without_teacher_is_a_clear_error(digits):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(RecipeError, match="needs a teacher"):
        compress(model, {"techniques": [{"type": "distill_kd"}]}, (digits.x_train, digits.y_train), lambda m: 0.0)


def test_feature_distillation_with_projection(digits, digits_teacher):
    import copy

    from jointcompress.data import evaluator
    from jointcompress.models import LeNet300

    torch.manual_seed(0)
    student = LeNet300(64)
    student.fc2 = torch.nn.Linear(300, 50)  # narrower hidden layer: needs a projection to 100
    student.fc3 = torch.nn.Linear(50, 10)
    teacher = copy.deepcopy(digits_teacher)
    recipe = {"training": {"epochs": 8, "lr": 2e-3},
              "techniques": [{"type": "distill_kd", "alpha": 0.8, "features": [{"student": "fc2", "teacher": "fc2"}]}]}
    res = compress(student, recipe, (digits.x_train, digits.y_train), evaluator(digits.x_test, digits.y_test), teacher=teacher)
    kd = res.techniques[0]
    assert isinstance(kd.projections[0], torch.nn.Linear) and kd.projections[0].weight.shape == (100, 50)
    assert res.metrics["accuracy"] > 0.8
    for a, b in zip(teacher.parameters(), digits_teacher.parameters()):
        assert torch.equal(a, b)  # the teacher never changed


def test_dense_predictions_are_distilled_over_their_class_axis_per_position():
    """A segmentation map [batch, classes, H, W]: the KL at each pixel over the classes, averaged
    over batch and pixels, i.e. the classifier's loss on the pixels as rows."""
    torch.manual_seed(0)
    s, t, T = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4), 2.0
    rows = lambda x: x.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731
    assert math.isclose(float(kd_loss(s, t, T)), float(kd_loss(rows(s), rows(t), T)), rel_tol=1e-5)
    assert abs(float(kd_loss(t.clone(), t, T))) < 1e-6
    # doubling the map (the same pixels twice) leaves the loss as it is
    assert math.isclose(float(kd_loss(torch.cat([s, s], 3), torch.cat([t, t], 3), T)), float(kd_loss(s, t, T)), rel_tol=1e-5)


def test_a_segmentation_model_compresses_with_the_default_loss_and_distillation():
    import copy

    import torch.nn as nn

    from jointcompress import finalize

    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = (x[:, 0] > 0).long() + (x[:, 0] > 1).long()  # 3 classes per pixel
    teacher = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 1))
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(teacher(x), y).backward()
        opt.step()
    model = copy.deepcopy(teacher)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5},
                             {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}],
              "training": {"epochs": 3, "batch_size": 16, "lr": 3e-3}}
    pixel_accuracy = lambda m: float((m(x).argmax(1) == y).float().mean())  # noqa: E731
    result = compress(model, recipe, (x, y), pixel_accuracy, teacher=teacher)
    losses = result.history.epochs[-1]["losses"]
    assert set(losses) == {"task", "distill"} and all(math.isfinite(v) for v in losses.values()), losses
    assert result.metrics["accuracy"] > 0.8, result.metrics
    assert float((model[0].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    model.eval()
    with torch.no_grad():
        masked = model(x)
        finalize(model, result.example_inputs)
        assert torch.equal(model(x), masked)


def test_a_single_output_is_refused_and_the_named_fix_distils_it():
    """One output per example (a regressor): the softmax KL is 0 at every step, so distillation would
    silently do nothing. It is refused with the fix named, and the fix (an MSE feature pair on the
    last layer, alpha 0) really pulls the student's outputs toward the teacher's."""
    import copy

    import torch.nn as nn

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x[:, :1] * 2.0
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    mse = lambda out, batch: F.mse_loss(out, batch[1])  # noqa: E731
    base = {"techniques": [{"type": "distill_kd", "alpha": 0.5}], "training": {"epochs": 1, "batch_size": 16}}
    with pytest.raises(RecipeError, match=r"one class.*distill_kd.features.*loss: mse.*alpha: 0"):
        compress(copy.deepcopy(teacher), base, (x, y), lambda m: 0.0, teacher=teacher, loss_fn=mse)
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    before = float(F.mse_loss(student(x), teacher(x)))
    fixed = {"techniques": [{"type": "distill_kd", "alpha": 0.0, "features": [{"student": "2", "teacher": "2"}]}],
             "training": {"epochs": 20, "batch_size": 16, "lr": 1e-2}}
    result = compress(student, fixed, (x, y), lambda m: 0.0, teacher=teacher, loss_fn=lambda out, batch: out.sum() * 0)
    with torch.no_grad():
        assert float(F.mse_loss(student(x), teacher(x))) < 0.2 * before
    assert result.history.epochs[-1]["losses"]["distill"] > 0


def test_a_teacher_that_cannot_serve_the_model_is_named_before_training():
    """A bf16 teacher, one of another input size or of other classes failed inside the first step's
    distillation with a bare RuntimeError; now each is a DataError naming the teacher and the fix.
    Hidden states alone (alpha 0) need no matching classes: that teacher distils."""
    import copy

    import torch.nn as nn

    from jointcompress import DataError

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x[:, :3].argmax(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    recipe = {"techniques": [{"type": "distill_kd"}], "training": {"epochs": 1, "batch_size": 16}}
    five = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    for teacher, words in ((copy.deepcopy(model).to(torch.bfloat16), r"cannot run on the model's inputs \(2, 8\) float32.*teacher.float\(\)"),
                           (nn.Sequential(nn.Linear(5, 3)), r"cannot run on the model's inputs .*same input size"),
                           (five, r"logits have shape \(2, 5\) and the model's \(2, 3\).*alpha: 0")):
        with pytest.raises(DataError, match=f"teacher: .*{words}"):
            compress(copy.deepcopy(model), recipe, (x, y), lambda m: 0.0, teacher=teacher)
    hidden = {"techniques": [{"type": "distill_kd", "alpha": 0.0, "features": [{"student": "0", "teacher": "0"}]}],
              "training": {"epochs": 1, "batch_size": 16}}
    result = compress(copy.deepcopy(model), hidden, (x, y), lambda m: 0.0, teacher=five)
    assert result.history.epochs[-1]["losses"]["distill"] > 0


@pytest.mark.parametrize("mode", ["joint", "overlap"])
def test_hidden_state_distillation_runs_under_a_size_target(mode, tmp_path):
    """The feature capture's hook kept the last output (a graph tensor): the size budget's measured copy
    and the overlap run's steering copy stopped in deepcopy's "Only Tensors created explicitly by the user"."""
    import copy

    from jointcompress import finalize
    from jointcompress.artifact.size import dense_fp32_bytes
    from jointcompress.artifact.store import save

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 3))
    teacher = copy.deepcopy(model).eval()
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    recipe = {"mode": mode, "target": {"ratio": 8},
              "techniques": [{"type": "prune_unstructured"}, {"type": "quant_lsq", "bits": 4},
                             {"type": "distill_kd", "alpha": 0.5, "features": [{"student": "2", "teacher": "2"}]}],
              "training": {"epochs": 2, "batch_size": 16}}
    result = compress(model, recipe, (x, y), lambda m: {"accuracy": 0.0}, teacher=teacher)
    spec = finalize(result.model, x[:2])
    manifest = save(result.model, spec, tmp_path / "a")
    assert manifest["weights_file_bytes"] <= 1.03 * dense_fp32_bytes(teacher) / 8  # the size target, steered by the copy


class _Conv(torch.nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.c, self.bn, self.f = torch.nn.Conv2d(1, 4, 3, stride=stride, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.f(self.bn(self.c(x)).mean((2, 3)))


def test_a_run_that_stops_on_an_error_leaves_the_teacher_as_it_was():
    """Feature maps of another size stop the run at its first step; the teacher stayed in eval mode with a
    capture hook on it (and on the student) holding an activation, until the notebook restarted."""
    torch.manual_seed(0)
    teacher, student = _Conv(stride=2).train(), _Conv(stride=1)
    recipe = {"training": {"epochs": 1, "batch_size": 32},
              "techniques": [{"type": "distill_kd", "features": [{"student": "c", "teacher": "c"}]}]}
    with pytest.raises(RecipeError):
        compress(student, recipe, (torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))), lambda m: 0.0, teacher=teacher)
    assert teacher.training
    assert not any(m._forward_hooks for m in teacher.modules()) and not any(m._forward_hooks for m in student.modules())


class _Tagger(torch.nn.Module):
    """Token ids -> per-token logits: the teacher's logits are as long as the batch's padding."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.out = torch.nn.Embedding(30, 8), torch.nn.Linear(8, 5)

    def forward(self, ids):
        return self.out(self.emb(ids))


def test_the_teacher_cache_steps_aside_for_inputs_padded_per_batch():
    """cache_teacher kept one logits shape per sample: a batch padded to another length crashed in the cache."""
    import jointcompress

    student, teacher = _Tagger(0), _Tagger(1)
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "cache_teacher": True}]},
                                    total_steps=4, teacher=teacher)
    for length in (11, 10):
        ids, labels = torch.randint(1, 30, (3, length)), torch.randint(0, 5, (3, length))
        batch = (ids, labels, torch.arange(3))
        if length == 10:
            with pytest.warns(UserWarning, match=r"cache_teacher: the inputs change shape .*computed on every batch"):
                terms = session.loss(student(ids), batch)
        else:
            terms = session.loss(student(ids), batch)
        assert torch.isfinite(terms["distill"])


def test_the_teacher_cache_stops_at_its_memory_cap_and_the_teacher_runs_on_every_batch():
    """A causal LM's logits ([tokens, vocabulary] a sample) outgrow the machine: the cache grew until the
    process was killed for memory. It now stops at its cap, frees what it held, and says so once."""
    import jointcompress

    student, teacher = _Tagger(0), _Tagger(1)
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "cache_teacher": True}]},
                                    total_steps=4, teacher=teacher)
    session.teacher_cache.limit_bytes = 5 * 6 * 4 * 4  # room for four samples of [6 tokens, 5 classes] float32
    ids, labels = torch.randint(1, 30, (4, 6)), torch.randint(0, 5, (4, 6))
    session.loss(student(ids), (ids, labels, torch.arange(4)))
    assert session.teacher_cache.get(torch.arange(4)) is not None  # within the cap: cached
    more = torch.randint(1, 30, (4, 6))
    with pytest.warns(UserWarning, match=r"cache_teacher: the teacher's logits would take more than .*every batch"):
        terms = session.loss(student(more), (more, labels, torch.arange(4, 8)))
    assert torch.isfinite(terms["distill"])
    assert session.teacher_cache.logits is None and session.teacher_cache.get(torch.arange(4)) is None  # freed
    expected = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd"}]}, total_steps=4,
                                     teacher=teacher).loss(student(more), (more, labels))["distill"]
    assert torch.allclose(terms["distill"], expected)  # the fresh logits, not stale ones


def test_the_teacher_cache_checks_its_first_reuse_and_is_not_an_evaluations():
    """Keyed by sample index only, the cache handed epoch 1's logits to an augmented view of the same sample
    every epoch after it, and a validation loss through session.loss (under no_grad, its own indices 0..n)
    overwrote the training samples' logits. The first reuse is now checked against a fresh forward, and a
    call under no_grad neither reads nor writes the cache."""
    import jointcompress

    student, teacher = _Tagger(0), _Tagger(1)
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "cache_teacher": True}]},
                                    total_steps=8, teacher=teacher)
    cache = session.teacher_cache
    ids, labels, index = torch.randint(1, 30, (4, 6)), torch.randint(0, 5, (4, 6)), torch.arange(4)
    session.loss(student(ids), (ids, labels, index))
    other = torch.randint(1, 30, (4, 6))
    with torch.no_grad():  # a validation batch, indexed in its own loader
        session.loss(student(other), (other, labels, index + 4))
    assert cache.get(index + 4) is None and torch.equal(cache.get(index), teacher(ids).detach())  # untouched
    session.loss(student(ids), (ids, labels, index))  # the same views: the first reuse checks out
    assert cache.checked and cache.off is None
    cache.checked = False  # as if this were the first reuse, now of an augmented view
    with pytest.warns(UserWarning, match=r"cache_teacher: a sample's teacher logits changed between epochs .*augmentation"):
        terms = session.loss(student(other), (other, labels, index))
    expected = jointcompress.prepare(_Tagger(0), {"techniques": [{"type": "distill_kd"}]}, total_steps=4,
                                     teacher=teacher).loss(student(other), (other, labels))["distill"]
    assert torch.allclose(terms["distill"], expected) and cache.off is not None and cache.logits is None


def test_the_teacher_cache_checks_again_every_so_many_reuses():
    """Checked on the first reuse only, a batch augmented later (now and then: a RandomApply) passed unseen, and
    the student got another view's cached logits for the rest of the run."""
    import jointcompress

    student, teacher = _Tagger(0), _Tagger(1)
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "cache_teacher": True}]},
                                    total_steps=200, teacher=teacher)
    cache = session.teacher_cache
    ids, labels, index = torch.randint(1, 30, (4, 6)), torch.randint(0, 5, (4, 6)), torch.arange(4)
    session.loss(student(ids), (ids, labels, index))  # cached
    session.loss(student(ids), (ids, labels, index))  # the first reuse, checked: the same views
    assert cache.checked and cache.off is None
    other = torch.randint(1, 30, (4, 6))  # an augmented view, met after the first check
    for _ in range(cache.RECHECK_EVERY - 2):
        session.loss(student(other), (other, labels, index))
    assert cache.off is None  # served from the cache between checks
    with pytest.warns(UserWarning, match=r"cache_teacher: a sample's teacher logits changed between epochs"):
        terms = session.loss(student(other), (other, labels, index))  # the next check
    expected = jointcompress.prepare(_Tagger(0), {"techniques": [{"type": "distill_kd"}]}, total_steps=4,
                                     teacher=teacher).loss(student(other), (other, labels))["distill"]
    assert torch.allclose(terms["distill"], expected) and cache.off is not None


def test_the_teacher_cache_reads_a_narrow_integer_index_and_refuses_a_float_column():
    """A uint8 index column was read by torch as a boolean mask (an IndexError inside the cache), and a float third
    column (per-sample weights) crashed there too."""
    import jointcompress

    student, teacher = _Tagger(0), _Tagger(1)
    ids, labels = torch.randint(1, 30, (4, 6)), torch.randint(0, 5, (4, 6))
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "cache_teacher": True}]},
                                    total_steps=4, teacher=teacher)
    session.loss(student(ids), (ids, labels, torch.tensor([3, 0, 2, 1], dtype=torch.uint8)))
    assert torch.equal(session.teacher_cache.get(torch.tensor([3])), teacher(ids[:1]).detach())
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "cache_teacher": True}]},
                                    total_steps=4, teacher=teacher)
    with pytest.warns(UserWarning, match=r"third element holds float32 values, not a sample index"):
        terms = session.loss(student(ids), (ids, labels, torch.rand(4)))
    assert torch.isfinite(terms["distill"]) and session.teacher_cache.off is not None
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "cache_teacher": True}]},
                                    total_steps=4, teacher=teacher)
    session.loss(student(ids), (ids, labels, torch.zeros(4, dtype=torch.long)))  # every row "sample 0"
    with pytest.warns(UserWarning, match=r"the sample indices repeat within a batch"):  # it blamed augmentation
        session.loss(student(ids), (ids, labels, torch.zeros(4, dtype=torch.long)))
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "cache_teacher": True}]},
                                    total_steps=4, teacher=teacher)  # a negative index read another sample's slot
    with pytest.warns(UserWarning, match=r"sample indices include -2: a negative index would read another sample's"):
        session.loss(student(ids), (ids, labels, torch.tensor([-2, 0, 1, 2])))
    assert session.teacher_cache.logits is None
    nan_teacher = _Tagger(1)  # its logits turn NaN after they were cached: that, not augmentation, is said
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "cache_teacher": True}]},
                                    total_steps=4, teacher=nan_teacher)
    session.loss(student(ids), (ids, labels, torch.arange(4)))
    with torch.no_grad():
        nan_teacher.out.bias[0] = float("nan")
    with pytest.warns(UserWarning, match=r"the teacher's logits hold NaN or inf for some samples"):
        session.loss(student(ids), (ids, labels, torch.arange(4)))


def test_the_teacher_runs_in_eval_mode_whatever_mode_the_loop_left_it_in():
    """prepare() put the teacher in eval mode once; a loop that called .train() on every model it holds ran the
    teacher with dropout and moved its BatchNorm statistics during distillation, without a word."""
    import torch.nn as nn

    import jointcompress

    torch.manual_seed(0)
    x = torch.randn(16, 20)
    teacher = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 2))
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    session = jointcompress.prepare(model, {"techniques": [{"type": "distill_kd", "temperature": 2.0, "alpha": 1.0}]},
                                    total_steps=4, teacher=teacher)
    statistics = teacher[1].running_mean.clone()
    for m in (model, teacher):
        m.train()
    outputs = model(x)
    terms = session.loss(outputs, (x, x[:, 0].gt(0).long()))
    assert torch.equal(teacher[1].running_mean, statistics) and teacher.training  # its mode put back, too
    teacher.eval()
    with torch.no_grad():
        expected = F.kl_div(F.log_softmax(outputs / 2, -1), F.softmax(teacher(x) / 2, -1), reduction="batchmean") * 4
    assert torch.allclose(terms["distill"], expected, atol=1e-6)


def test_a_teacher_with_nan_weights_is_refused_before_training_by_name():
    """A teacher whose weights held NaN made every step's distill term NaN: three rollbacks, then an error about
    the learning rate and the data. It is refused before training, naming the parameter."""
    import torch.nn as nn

    from jointcompress import DataError

    torch.manual_seed(0)
    x = torch.randn(32, 8)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        teacher[2].weight[0, 0] = float("nan")
    with pytest.raises(DataError, match=r"teacher: its logits on the first batch hold NaN or inf \(its parameters "
                                        r"2.weight hold NaN or inf\)"):
        compress(copy.deepcopy(model), {"techniques": [{"type": "distill_kd"}], "training": {"epochs": 1}},
                 (x, x[:, :3].argmax(1)), lambda m: 0.0, teacher=teacher)


def test_token_distillation_of_a_tuple_batch_leaves_out_the_ignored_positions():
    """((ids), labels) with -100 on the padding: the KL was averaged over the padding too (a dict batch's
    attention_mask was the only mask read)."""
    import jointcompress

    student, teacher = _Tagger(0), _Tagger(1)
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]},
                                    total_steps=4, teacher=teacher)
    ids, labels = torch.randint(1, 30, (3, 8)), torch.randint(0, 5, (3, 8))
    labels[0, 5:], labels[1, 3:] = -100, -100
    tuple_term = session.loss(student(ids), (ids, labels))["distill"]
    real = labels != -100
    s, t = F.log_softmax(student(ids) / 2, -1), F.log_softmax(teacher(ids) / 2, -1)
    per_token = (t.exp() * (t - s)).sum(-1) * 4  # T^2 KL per position
    assert torch.allclose(tuple_term / 0.5, per_token[real].mean(), atol=1e-6)  # alpha 0.5


def test_an_evaluate_that_is_not_a_function_is_refused_before_training(digits):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RecipeError, match=r"evaluate is NoneType, not a function.*evaluator\(x_test, y_test\)"):
        compress(model, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, (digits.x_train, digits.y_train), None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing trained


def test_the_kd_loss_is_taken_in_float32_for_a_bf16_teacher():
    """A teacher loaded in bf16 that takes token ids passes every dtype check; its logits made the KL's
    log_softmax run in bf16: a negative KL between near distributions, and a gradient pointing elsewhere."""
    from jointcompress.hf.student import kd_loss as hf_kd_loss

    torch.manual_seed(0)
    teacher = (torch.randn(64, 10) * 8).bfloat16()
    student = (teacher.float() + 0.01 * torch.randn(64, 10)).requires_grad_()
    for loss_fn in (kd_loss, hf_kd_loss):
        loss = loss_fn(student, teacher, 1.0)
        reference = loss_fn(student, teacher.float(), 1.0)
        assert loss.dtype == torch.float32 and float(loss) >= 0 and torch.equal(loss, reference)
    tokens = teacher.reshape(8, 8, 10)  # token-level and dense predictions take the same path
    assert torch.equal(kd_loss(student.reshape(8, 8, 10), tokens, 2.0), kd_loss(student.reshape(8, 8, 10), tokens.float(), 2.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 student under autocast too
        assert float(kd_loss(student.bfloat16(), teacher, 1.0)) >= 0
    assert kd_loss(student.double(), teacher.double(), 1.0).dtype == torch.float64  # a float64 model keeps its precision


def test_feature_pairs_read_a_dict_output_and_name_a_module_that_gives_none():
    """A paired module returning a dict (a transformers encoder's ModelOutput) and one the forward never calls both
    failed with "'...' object has no attribute 'dim'"; prepare() with features left an eval-mode model in train
    mode."""
    from torch import nn

    from jointcompress import prepare

    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.fc = nn.Linear(8, width)

        def forward(self, x):
            return {"hidden": torch.relu(self.fc(x)), "extra": None}

    class Net(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.block, self.head, self.aux = Block(width), nn.Linear(width, 3), nn.Linear(width, 2)

        def forward(self, x):
            return self.head(self.block(x)["hidden"])

    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    pairs = lambda name: {"techniques": [{"type": "distill_kd", "alpha": 0.5,  # noqa: E731
                                          "features": [{"student": name, "teacher": "block"}]}]}
    student = Net(4).eval()
    session = prepare(student, pairs("block"), total_steps=2, teacher=Net(6), example_inputs=x[:2])
    assert not student.training  # its mode as the caller left it
    student.train()
    terms = session.loss(student(x), (x, y))
    kd = next(t for t in session.techniques if t.kind == "distill_kd")
    assert float(terms["distill"]) > 0 and kd.projections[0].weight.shape == (6, 4)  # the dict's tensor, 4 wide to 6
    with pytest.raises(RecipeError, match=r"features\[0\]\.student: 'aux' gave no tensor on the example inputs"):
        prepare(Net(4), pairs("aux"), total_steps=2, teacher=Net(6), example_inputs=x[:2])


def test_a_run_of_distillation_alone_logs_its_loss_curve():
    """alpha: 1 leaves one loss term, which nothing coordinates: history.steps stayed empty (no per-step curve in
    history.json, the report or TensorBoard's history), where alpha 0.99 logged every log_every steps."""
    from torch import nn

    torch.manual_seed(0)
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    recipe = {"techniques": [{"type": "distill_kd", "alpha": 1.0}], "training": {"epochs": 2, "batch_size": 16},
              "coordination": {"log_every": 2}}
    result = compress(nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 5)), recipe, (x, y), lambda m: 0.0,
                      teacher=nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5)).eval())
    assert [s["step"] for s in result.history.steps] == [0, 2, 4, 6]
    assert all(set(s["terms"]) == {"distill"} and s["terms"]["distill"] > 0 for s in result.history.steps)


def test_teacher_logits_on_another_device_are_named():
    """prepare() without example_inputs skips the teacher's check on a batch: a teacher on another device met the
    model's logits first in F.kl_div ("Tensor on device cpu is not on the expected device meta!")."""
    from jointcompress.errors import DataError
    from jointcompress.techniques.distill_kd import check_teacher_logits

    with pytest.raises(DataError, match=r"teacher: its logits are on meta and the model's on cpu.*teacher\.to\(device\)"):
        check_teacher_logits(torch.randn(4, 3), torch.empty(4, 3, device="meta"))


def test_a_feature_pair_of_other_axes_is_refused_before_training_naming_both_modules():
    """A Linear's (batch, 16) paired with a conv's (batch, 8, 8, 8) was refused at the first step, with the shape
    of the package's own projection, (batch, 8), as the student's, and neither module named."""
    from torch import nn

    from jointcompress import compress
    from jointcompress.errors import RecipeError

    class CNN(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.fc, self.out = nn.Conv2d(1, c, 3, padding=1), nn.Linear(c * 64, 16), nn.Linear(16, 10)

        def forward(self, x):
            return self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))

    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    steps = []
    recipe = {"techniques": [{"type": "distill_kd", "alpha": 0.5, "features": [{"student": "fc", "teacher": "conv"}]}],
              "training": {"epochs": 1, "batch_size": 16}}
    with pytest.raises(RecipeError, match=r"features\[0\]: student 'fc' gives \(2, 16\) and teacher 'conv' gives "
                                          r"\(2, 8, 8, 8\) on the example inputs"):
        compress(CNN(4), recipe, (x, y), lambda m: {"accuracy": 0.0}, teacher=CNN(8), callbacks=[_Counting(steps)])
    assert steps == []  # before the first step
    recipe["techniques"][0]["features"] = [{"student": "conv", "teacher": "conv"}]  # 4 vs 8 channels: bridged
    compress(CNN(4), recipe, (x, y), lambda m: {"accuracy": 0.0}, teacher=CNN(8))


class _Counting:
    def __init__(self, steps):
        self.steps = steps

    def on_step(self, trainer, step, out):
        self.steps.append(step)


def test_an_evaluation_without_sample_indices_leaves_the_teacher_cache_on():
    """A validation loss through session.loss under no_grad, on batches without an index column, was judged by the
    cache's check: it switched the cache off for the rest of training (with a warning about the training batches)."""
    import warnings

    import jointcompress

    student, teacher = _Tagger(0), _Tagger(1)
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "cache_teacher": True}]},
                                    total_steps=8, teacher=teacher)
    ids, labels, index = torch.randint(1, 30, (4, 6)), torch.randint(0, 5, (4, 6)), torch.arange(4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no word about the cache either
        session.loss(student(ids), (ids, labels))  # an evaluation batch: no index column
    session.loss(student(ids), (ids, labels, index))
    assert session.teacher_cache.off is None and torch.equal(session.teacher_cache.get(index), teacher(ids).detach())


def test_a_misnamed_feature_module_is_answered_with_the_closest_names_and_those_at_its_depth():
    """The refusal listed the first 400 characters of every module name, which ended inside layer 0's submodules:
    the user never saw encoder.layer.N, nor how many layers the student has."""
    import jointcompress
    from hf_helpers import tiny_bert

    recipe = {"techniques": [{"type": "distill_kd", "features": [{"student": "bert.encoder.layer.9",
                                                                  "teacher": "bert.encoder.layer.3"}]}]}
    with pytest.raises(RecipeError) as err:
        jointcompress.prepare(tiny_bert(layers=2), recipe, total_steps=4, teacher=tiny_bert(layers=4),
                              example_inputs=torch.randint(5, 60, (2, 6)))
    said = str(err.value)
    assert "features[0].student: no module named 'bert.encoder.layer.9' in the student; did you mean" in said
    assert "the modules at that depth: " in said and "bert.encoder.layer.1" in said and "bert.encoder.layer.2" not in said


def test_batches_without_a_sample_index_are_said_with_the_trainers_column_setting():
    """Under the transformers Trainer an 'index' column is dropped (remove_unused_columns), and the warning only
    blamed a map-style Dataset's loader."""
    import jointcompress

    student, teacher = _Tagger(0), _Tagger(1)
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "cache_teacher": True}]},
                                    total_steps=4, teacher=teacher)
    ids, labels = torch.randint(1, 30, (4, 6)), torch.randint(0, 5, (4, 6))
    with pytest.warns(UserWarning, match=r"carry no sample index .*TrainingArguments\(remove_unused_columns=False\)"):
        session.loss(student(ids), (ids, labels))
    assert session.teacher_cache.off is not None


def test_a_multi_label_classifier_is_refused_the_softmax_distillation():
    """A multi-label classifier (a sigmoid a label) was distilled with the softmax KL, which sees only the differences
    between its logits: a student whose every logit was the teacher's + 6 read a distill term of 0."""
    from transformers import BertConfig, BertForSequenceClassification

    import jointcompress

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        num_labels=3, problem_type="multi_label_classification")
    teacher, student = BertForSequenceClassification(config), BertForSequenceClassification(config)
    with pytest.raises(RecipeError, match=r"multi-label classifier .* distill_kd.features"):
        jointcompress.prepare(student, {"techniques": [{"type": "distill_kd"}]}, total_steps=4, teacher=teacher)
    jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "alpha": 0, "features": [
        {"student": "classifier", "teacher": "classifier"}]}]}, total_steps=4, teacher=teacher,
        example_inputs={"input_ids": torch.randint(0, 50, (2, 6))})


def test_a_teacher_that_ends_in_a_softmax_is_said_and_a_teacher_tuple_is_said_as_the_teachers():
    """A teacher returning probabilities was distilled as if they were logits (the KD term halved, the teacher's
    knowledge flattened) without a word; a teacher returning (logits, hidden) was said to give the model a second
    head that drifts."""
    import warnings

    import jointcompress

    torch.manual_seed(0)
    x = torch.randn(16, 6)
    student, base = nn.Linear(6, 3), nn.Linear(6, 3)
    recipe = {"techniques": [{"type": "distill_kd"}]}
    with pytest.warns(UserWarning, match=r"teacher: its outputs are probabilities .*without its final softmax"):
        jointcompress.prepare(student, recipe, total_steps=2, teacher=nn.Sequential(base, nn.Softmax(-1)),
                              example_inputs=x[:2])

    class WithHidden(nn.Module):
        def forward(self, inputs):
            return base(inputs), inputs

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        jointcompress.prepare(nn.Linear(6, 3), recipe, total_steps=2, teacher=WithHidden(), example_inputs=x[:2])
    texts = [str(w.message) for w in said]
    assert any(t.startswith("teacher outputs: a tuple of 2 tensors") for t in texts), texts
    assert not any("second head" in t or "probabilities" in t for t in texts), texts


def test_cache_teacher_beside_features_says_the_teacher_runs_on_every_batch():
    """With features matched the cache is off (the teacher's hidden states are read every batch): documented, but a
    run asked for cache_teacher said nothing."""
    import jointcompress

    x = torch.randn(4, 6)
    recipe = {"techniques": [{"type": "distill_kd", "cache_teacher": True,
                              "features": [{"student": "0", "teacher": "0"}]}]}
    with pytest.warns(UserWarning, match=r"distill_kd.cache_teacher is off where features are matched"):
        jointcompress.prepare(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), recipe, total_steps=2,
                              teacher=nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), example_inputs=x[:2])


def test_a_hidden_state_from_a_later_no_grad_forward_is_refused():
    """The feature hooks keep the student's latest forward: a monitoring call under no_grad between the training
    forward and session.loss made the feature term compare another batch's hidden state, without a word."""
    import jointcompress
    from jointcompress.errors import TrainingError

    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    recipe = {"techniques": [{"type": "distill_kd", "alpha": 0.5, "features": [{"student": "0", "teacher": "0"}]}]}
    session = jointcompress.prepare(student, recipe, total_steps=4, teacher=teacher, example_inputs=x[:2])
    out = student(x[:16])
    first = float(session.loss(out, (x[:16], y[:16]))["distill"])
    out = student(x[:16])
    with torch.no_grad():
        student(x[16:])  # a monitoring forward on other inputs
    with pytest.raises(TrainingError, match=r"distill_kd.features: the student's module '0' last ran under "
                                            r"torch.no_grad\(\).*right after the training forward"):
        session.loss(out, (x[:16], y[:16]))
    out = student(x[:16])  # in order: the same term as the first time
    assert float(session.loss(out, (x[:16], y[:16]))["distill"]) == pytest.approx(first)


def test_a_task_loss_given_under_alpha_1_is_said_to_be_unused():
    """alpha 1 weighs the task loss by 0: a task_loss given to session.loss (or a loss_fn) vanished without a word."""
    import warnings

    import jointcompress

    torch.manual_seed(0)
    student, teacher = nn.Linear(8, 3), nn.Linear(8, 3)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "alpha": 1.0}]}, total_steps=2,
                                    teacher=teacher)
    with pytest.warns(UserWarning, match=r"distill_kd.alpha is 1: .*not trained on"):
        terms = session.loss(student(x), (x, y), task_loss=F.cross_entropy(student(x), y))
    assert set(terms) == {"distill"}
    half = jointcompress.prepare(nn.Linear(8, 3), {"techniques": [{"type": "distill_kd", "alpha": 0.5}]}, total_steps=2,
                                 teacher=teacher)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="distill_kd.alpha is 1")
        assert set(half.loss(half.model(x), (x, y), task_loss=F.cross_entropy(half.model(x), y))) == {"task", "distill"}


def test_a_teacher_given_without_distill_kd_is_said_unused():
    """compress(..., teacher=t) with no distill_kd in the recipe ran without distillation and without a word (the
    teacher ran 0 times); a teacher that is the model's own starting state (what the command line passes) is not
    said."""
    import warnings

    import jointcompress

    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    student = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    plain = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5}], "training": {"epochs": 1, "batch_size": 16}}
    with pytest.warns(UserWarning, match=r"teacher: given, but the recipe has no distill_kd") as said:
        compress(student, plain, (x, y), lambda m: 0.0, teacher=teacher)
    assert len([w for w in said if "no distill_kd" in str(w.message)]) == 1  # once, not again by the session
    with pytest.warns(UserWarning, match=r"teacher: given, but the recipe has no distill_kd"):  # a bare Linear too
        jointcompress.prepare(nn.Linear(8, 3), plain, total_steps=2, teacher=nn.Linear(8, 3))
    own = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="teacher: given")
        compress(copy.deepcopy(own), plain, (x, y), lambda m: 0.0, teacher=own)  # its own start: as the CLI passes it

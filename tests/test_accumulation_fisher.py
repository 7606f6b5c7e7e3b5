"""Gradient accumulation and the Fisher estimate: K micro-batches of a batch (each micro-batch's terms
scaled by 1/K, as CompressionTrainer does) give the estimate, and everything that reads it (the learned
widths' noise price, the size budget's saliency), that the one batch gives, to float rounding. The
estimate once folded only the last micro-batch's gradient (already scaled by 1/K) with the micro-batch's
size: 10-90x too small, and runs ended at other accuracies for K = 1, 2, 4."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

import jointcompress

SAMPLES = 64


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, 12, generator=g)
    return x, (x[:, :3].sum(1) > 0).long()


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 2))


def _recipe(saliency: bool, strategy: str) -> dict:
    budget = {"type": "size_budget", "target_bytes": 900.0, "end": 0.6, "freeze": 0.8}
    if saliency:
        budget["saliency"] = 30.0
    # step sizes in log8 (the default under this target): the size term conflicts with accuracy at this step,
    # so PCGrad projects (test_pcgrad_resolves_the_micro_batches_as_one_batch); in fp16 it finds nothing to project
    return {"techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True, "learn_bits": True, "compile": False},
                           {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5},
                           budget],
            "coordination": {"strategy": strategy, "every": 1}}


def _quantizers(model):
    return {name: m.parametrizations.weight[0] for name, m in model.named_modules()
            if hasattr(m, "parametrizations") and hasattr(m.parametrizations.weight[0], "width_fisher")}


def _start(saliency=False, strategy="none"):
    teacher = _mlp(1)
    model = _mlp(0)
    x, _ = _data()
    session = jointcompress.prepare(model, _recipe(saliency, strategy), total_steps=40, teacher=teacher,
                                    example_inputs=x[:2])
    optimizer = torch.optim.SGD(session.param_groups(lr=0.0), lr=0.0)  # lr 0: the step changes no weight
    session.bind(optimizer)
    return model, session, optimizer


def _micro_batches(model, session, x, y, k, between=None):
    """One accumulated step's forwards and backwards: k micro-batches, terms scaled by 1/k. Returns
    the coordination stats the last backward returned."""
    stats = None
    for i, (xm, ym) in enumerate(zip(x.chunk(k), y.chunk(k))):
        if i and between is not None:
            between()
        terms = session.loss(model(xm), (xm, ym))
        if k > 1:
            terms = {name: t / k for name, t in terms.items()}
        stats = session.backward(terms)
    return stats


def _one_step(k, saliency=False, strategy="none", between=None, x=None, y=None):
    """The Fisher estimate, the gradients the techniques add before the optimizer step and every
    parameter's gradient then, after one step of k micro-batches over the same SAMPLES samples."""
    model, session, optimizer = _start(saliency, strategy)
    if x is None:
        x, y = _data()
    optimizer.zero_grad()
    _micro_batches(model, session, x, y, k, between)
    session.before_step()
    qs = _quantizers(model)
    assert qs and all(bool(q.width_fisher_seen) for q in qs.values())
    out = {"fisher": {n: q.width_fisher.clone() for n, q in qs.items()},
           "bits_grad": {n: q.bits_raw.grad.clone() for n, q in qs.items()},
           "dead_zone_grad": {n: q.dead_zone_raw.grad.clone() for n, q in qs.items()},
           "grad": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    optimizer.step()
    session.after_step()
    return out


def _assert_same(a, b, what=("fisher", "bits_grad", "dead_zone_grad", "grad")):
    for key in what:
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-4, atol=1e-9, msg=f"{key} of {name}")


@pytest.mark.parametrize("saliency", [False, True])
@pytest.mark.parametrize("strategy", ["none", "pcgrad"])
def test_four_micro_batches_give_the_fisher_estimate_of_one_batch(saliency, strategy):
    """pcgrad: a measured step catches each term's part of the gradient in its own backward."""
    one = _one_step(1, saliency, strategy)
    four = _one_step(4, saliency, strategy)
    assert all(float(f.sum()) > 0 for f in one["fisher"].values())
    _assert_same(one, four)


def _coordinated(k: int, strategy: str):
    """Every parameter's gradient after before_step, and the stats the last backward returned, for one step
    of k micro-batches."""
    model, session, optimizer = _start(strategy=strategy)
    x, y = _data()
    optimizer.zero_grad()
    stats = _micro_batches(model, session, x, y, k)
    session.before_step()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, stats


def test_pcgrad_resolves_the_micro_batches_as_one_batch():
    """PCGrad's projection is not linear: each of four micro-batches projected on its own, and their sum
    taken, differed from one batch of the same samples (a Trainer with gradient_accumulation_steps > 1 got
    that). The step now resolves the per-term gradients summed over its micro-batches (scale's damping
    goes the same way), and the stats the last backward returned describe that update."""
    (one, one_stats), (four, four_stats) = _coordinated(1, "pcgrad"), _coordinated(4, "pcgrad")
    assert one_stats.changed > 1e-3  # the strategy changes this update: the terms conflict
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-8, msg=name)
    assert four_stats.changed == pytest.approx(one_stats.changed, rel=1e-4)
    assert four_stats.cosines.keys() == one_stats.cosines.keys()


def test_none_reports_the_conflicts_of_the_whole_batch_under_accumulation():
    """none changes no update, but its statistics (history, compare's conflict column) described the
    last micro-batch only."""
    one, four = _coordinated(1, "none")[1], _coordinated(4, "none")[1]
    assert one.cosines and four.cosines.keys() == one.cosines.keys()
    for key, cosine in one.cosines.items():
        assert four.cosines[key] == pytest.approx(cosine, rel=1e-3, abs=1e-5), key


def test_a_step_zeroed_and_run_again_at_the_same_number_is_not_summed_with_the_first():
    """A loop that drops a step (zero_grad, as after a non-finite loss) and runs it again at the same step
    number: the first try's per-term gradients must not join the second's resolution."""
    x, y = _data()
    model, session, optimizer = _start(strategy="pcgrad")
    optimizer.zero_grad()
    _micro_batches(model, session, x[:32], y[:32], 2)  # the first try, dropped before the optimizer step
    optimizer.zero_grad()
    _micro_batches(model, session, x, y, 4)
    session.before_step()
    again = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    one = _one_step(1, strategy="pcgrad")["grad"]
    for name in one:
        torch.testing.assert_close(again[name], one[name], rtol=1e-4, atol=1e-8, msg=name)


def test_uneven_micro_batches_count_every_sample():
    """Micro-batches of 24, 24 and 16 samples (each scaled by its share of the batch): B is 64."""
    x, y = _data()
    one = _one_step(1, saliency=True)
    model, session, optimizer = _start(saliency=True)
    optimizer.zero_grad()
    for xm, ym in zip(x.split(24), y.split(24)):
        terms = session.loss(model(xm), (xm, ym))
        session.backward({name: t * (len(xm) / SAMPLES) for name, t in terms.items()})
    session.before_step()
    for name, q in _quantizers(model).items():
        torch.testing.assert_close(q.width_fisher, one["fisher"][name], rtol=1e-4, atol=1e-9)


def test_forwards_that_are_not_micro_batches_of_the_step_add_nothing():
    """Between the micro-batches: an evaluation under no_grad (with the session's loss), and the model
    run and differentiated outside the session (a measurement): neither joins the step's estimate."""
    x, y = _data()
    probe = torch.randn(5, 12)
    state = {}

    def between():
        model = state["model"]
        with torch.no_grad():
            state["session"].loss(model(probe), (probe, torch.zeros(5, dtype=torch.long)))
        w = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(model(probe).square().sum(), w, allow_unused=True)  # .grad untouched

    one = _one_step(1, saliency=True)
    model, session, optimizer = _start(saliency=True)
    state.update(model=model, session=session)
    optimizer.zero_grad()
    _micro_batches(model, session, x, y, 4, between)
    session.before_step()
    for name, q in _quantizers(model).items():
        torch.testing.assert_close(q.width_fisher, one["fisher"][name], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_skipped_accumulated_step_is_not_carried_into_the_next(set_to_none):
    """A loop that skips the optimizer step after a non-finite gradient and zeroes the gradients: what
    its micro-batches caught (inf) is dropped at the next step's first forward. Zeroed in place too
    (set_to_none=False: the gradients stay allocated), which once carried the inf into the next step."""
    x, y = _data()
    one = _one_step(1, saliency=True)
    model, session, optimizer = _start(saliency=True)
    optimizer.zero_grad()
    for i, (xm, ym) in enumerate(zip(x.chunk(2), y.chunk(2))):
        terms = session.loss(model(xm), (xm, ym))
        scale = float("inf") if i == 1 else 0.5
        session.backward({name: t * scale for name, t in terms.items()})
    optimizer.zero_grad(set_to_none=set_to_none)  # skipped: no before_step, optimizer.step, after_step
    _micro_batches(model, session, x, y, 4)
    session.before_step()
    for name, q in _quantizers(model).items():
        assert torch.isfinite(q.width_fisher).all()
        torch.testing.assert_close(q.width_fisher, one["fisher"][name], rtol=1e-4, atol=1e-9)


def test_the_second_step_folds_only_its_own_micro_batches():
    """Two accumulated steps in a row: the second folds its own K micro-batches into the average (the
    first step's sum is not carried over), as two one-batch steps do."""
    x, y = _data()
    x2, y2 = _data(seed=1)
    results = {}
    for k in (1, 4):
        model, session, optimizer = _start(saliency=True)
        for xb, yb in ((x, y), (x2, y2)):
            optimizer.zero_grad()
            _micro_batches(model, session, xb, yb, k)
            session.before_step()
            optimizer.step()
            session.after_step()
        results[k] = {n: q.width_fisher.clone() for n, q in _quantizers(model).items()}
    for name in results[1]:
        torch.testing.assert_close(results[4][name], results[1][name], rtol=1e-4, atol=1e-9)


def test_compression_trainer_accumulation_gives_the_fisher_estimate_of_one_batch(tmp_path):
    """The same through transformers' Trainer: batch 64 x accumulation 1 vs batch 16 x accumulation 4."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from jointcompress.integrations.hf_trainer import CompressionTrainer

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp(0)

        def forward(self, x, labels=None):
            return {"logits": self.body(x)}

    x, y = _data()
    rows = [{"x": x[i], "labels": y[i]} for i in range(SAMPLES)]
    recipe = _recipe(saliency=True, strategy="none")
    recipe["techniques"] = [t for t in recipe["techniques"] if t["type"] != "distill_kd"]
    fisher = {}
    for batch, accum in ((SAMPLES, 1), (SAMPLES // 4, 4)):
        model = Net()
        session = jointcompress.prepare(model, recipe, total_steps=10, example_inputs=x[:2])
        args = TrainingArguments(output_dir=str(tmp_path / f"a{accum}"), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accum, max_steps=1, learning_rate=0.0, report_to=[],
                                 save_strategy="no", use_cpu=True, seed=0, logging_strategy="no", disable_tqdm=True,
                                 dataloader_drop_last=True)
        CompressionTrainer(session=session, model=model, args=args, train_dataset=rows).train()
        fisher[accum] = {n: q.width_fisher.clone() for n, q in _quantizers(model).items()}
        assert fisher[accum] and all(float(f.sum()) > 0 for f in fisher[accum].values())
    for name in fisher[1]:
        torch.testing.assert_close(fisher[4][name], fisher[1][name], rtol=1e-4, atol=1e-9)


def test_a_forward_is_new_even_where_its_output_takes_a_freed_outputs_place():
    """Forwards were told apart by id(output): an evaluation under no_grad replaced the quantizer's last
    output, the training output was freed, and a measurement's forward could get its id, so its gradient
    was added to the step's (the flaky test above, one run in ~60). The same tensor object handed to
    `watch` three times stands for three outputs at one address: only the two joined forwards count."""
    from jointcompress.techniques.learned_width import FisherDiagonal

    fisher = FisherDiagonal(torch.zeros(3), torch.zeros((), dtype=torch.bool))
    weight = torch.zeros(3, requires_grad=True)
    weight.grad = torch.ones(3)  # the step's gradients are accumulating
    out = torch.zeros(3, requires_grad=True) * 1.0
    fisher.watch(out, weight)  # micro-batch 1, joined by the session
    fisher.join(4)
    fisher.catch(torch.ones(3))
    fisher.watch(out, weight)  # a measurement's forward and backward, never joined
    fisher.catch(torch.full((3,), 100.0))
    fisher.watch(out, weight)  # micro-batch 2
    fisher.join(4)
    fisher.catch(torch.ones(3))
    assert fisher.fold(4)
    torch.testing.assert_close(fisher.estimate(), torch.full((3,), 2.0 ** 2 * 8))  # summed gradient, 8 samples

"""fp16 mixed precision's loss scaling through the session (session/loss_scale.py): a loop that hands
`session.backward` its torch.amp.GradScaler trains what the same loop without one trains (the
coordinated backward scales every term, before_step unscales before the techniques add their own
gradients, the Fisher estimate divides the scale out), and a step the scale overflowed is skipped
without poisoning the Fisher estimate. Before, `backward` had no place for a scaler: the transformers
Trainer with fp16=True stopped at its first step (the scaler had never scaled a loss)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import jointcompress
from jointcompress.errors import RecipeError
from jointcompress.session.loss_scale import innermost

STEPS = 4


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 12, generator=g)
    return x, (x[:, :3].sum(1) > 0).long()


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 2))


# learned widths and the Fisher saliency's price: before_step folds the caught gradients and adds
# gradients of its own (the widths' noise price, the dead zones' saliency), the parts a scale would skew
RECIPE = {"techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True, "learn_bits": True, "compile": False},
                         {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5},
                         {"type": "size_budget", "target_bytes": 900.0, "end": 0.6, "freeze": 0.8, "saliency": 30.0}],
          "coordination": {"strategy": "pcgrad", "every": 1}}


def _fishers(model):
    return {name: m.parametrizations.weight[0].width_fisher.clone() for name, m in model.named_modules()
            if hasattr(m, "parametrizations")}


def _train(scaler=None, unscale_in_loop=False, micro_batches=1):
    model = _mlp(0)
    x, y = _data()
    session = jointcompress.prepare(model, RECIPE, total_steps=40, teacher=_mlp(1), example_inputs=x[:2])
    optimizer = torch.optim.SGD(session.param_groups(lr=0.05), lr=0.05)
    session.bind(optimizer)
    skipped = 0
    for _ in range(STEPS):
        optimizer.zero_grad()
        for xm, ym in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            terms = session.loss(model(xm), (xm, ym))
            session.backward({k: t / micro_batches for k, t in terms.items()}, scaler=scaler)
        if scaler is None:
            session.before_step()
            optimizer.step()
        else:
            if unscale_in_loop:  # as the transformers Trainer does, to clip
                scaler.unscale_(optimizer)
            session.before_step()
            before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped += scaler.get_scale() < before
        session.after_step()
    return model, skipped


def _assert_same_training(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), (name, (p - q).abs().max())
    fa, fb = _fishers(a), _fishers(b)
    assert fa and all(bool(f.gt(0).any()) for f in fa.values())  # the Fisher estimate was folded
    for name in fa:
        assert torch.allclose(fa[name], fb[name], rtol=1e-3, atol=1e-12), name


@pytest.mark.parametrize("unscale_in_loop", [False, True])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_scaled_backward_trains_what_the_unscaled_one_trains(unscale_in_loop, micro_batches):
    """With 2 micro-batches PCGrad settles the step's summed per-term gradients, which carry the scale: a loop
    that unscales first (to clip) had that difference added S times too large."""
    plain, _ = _train(micro_batches=micro_batches)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=10_000)
    scaled, skipped = _train(scaler, unscale_in_loop, micro_batches)
    assert skipped == 0
    _assert_same_training(plain, scaled)


def test_an_overflowed_step_is_skipped_and_leaves_the_fisher_estimate_finite():
    # a scale near float32's largest number overflows the gradients: the scaler skips those steps and backs off
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38, growth_interval=10_000)
    model, skipped = _train(scaler)
    assert skipped >= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(f).all() for f in _fishers(model).values())


def test_a_disabled_scaler_changes_nothing_and_a_wrong_object_is_named():
    plain, _ = _train()
    off, _ = _train(torch.amp.GradScaler("cpu", enabled=False))
    _assert_same_training(plain, off)
    with pytest.raises(RecipeError, match="scaler=.*GradScaler"):
        _train(scaler=object())


def test_the_scaler_unscales_the_optimizer_inside_a_wrapper():
    inner = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)

    class Wrapper(torch.optim.Optimizer):  # the shape of accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert innermost(Wrapper(inner)) is inner and innermost(inner) is inner

"""The fused zero-level quantizer and size estimate compute what the plain formulas compute.

The forward pass applies the dead-zone gate and counts the kept weights in one autograd node,
the size term reads that count instead of passing over the weights again, and the byte
model is evaluated for all layers and index widths at once. Here each is checked against the
straightforward composition of the same formulas (values and gradients), on small layers
that exercise every branch: weights inside and outside the dead zone, beyond the clipping
range, exact zeros, per-channel and per-tensor steps, conv weights, a fixed pattern.
"""
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from jointcompress import prepare
from jointcompress.techniques.quant_lsq import grad_scale
from jointcompress.techniques.size_estimate import INDEX_WIDTHS, sparse_layer_bytes
from jointcompress.techniques.zero_level import GATE_TEMPERATURE, ZeroLevelLSQWeight


class PlainDeadZoneQuant(torch.autograd.Function):
    """The dead-zone quantizer written plainly (bool masks, one formula per line)."""

    @staticmethod
    def forward(ctx, w, s, t, qmax, keep):
        v = w / s
        mag = torch.clamp(torch.round(v.abs()), min=1, max=qmax)
        gate = keep if keep is not None else v.abs() >= t
        q = torch.where(gate, torch.sign(v) * mag, torch.zeros_like(v))
        ctx.save_for_backward(v, q, s, t)
        ctx.qmax, ctx.fixed = qmax, keep is not None
        return q * s

    @staticmethod
    def backward(ctx, grad):
        v, q, s, t = ctx.saved_tensors
        inside = v.abs() <= ctx.qmax
        dims = tuple(range(1, grad.dim()))

        def per_channel(x, like):
            return x.sum(dim=dims, keepdim=True) if like.numel() > 1 else x.sum().view_as(like)

        grad_s = per_channel(grad * torch.where(inside, q - v, torch.sign(v) * ctx.qmax), s)
        grad_t = None
        if not ctx.fixed:
            sig = torch.sigmoid((v.abs() - t) / GATE_TEMPERATURE)
            level = torch.sign(v) * torch.clamp(torch.round(v.abs()), min=1, max=ctx.qmax)
            grad_t = per_channel(grad * (-level * s * sig * (1 - sig) / GATE_TEMPERATURE), t)
        return grad * inside, grad_s, grad_t, None, None


def plain_forward(q: ZeroLevelLSQWeight, w: torch.Tensor) -> torch.Tensor:
    qmax = q.qmax
    n = w[0].numel() if q.per_channel else w.numel()
    s_grad = grad_scale(q.log_step, 1.0 / math.sqrt(n * qmax)).exp() * q.step_multiplier()
    s = q.effective_step().detach() + (s_grad - s_grad.detach())
    keep = q.keep if bool(q.pattern_fixed) else None
    return PlainDeadZoneQuant.apply(w, s, q.dead_zone(), qmax, keep)


def plain_layer_bytes(nonzero, numel, bits):
    """The byte model, one format and one index width at a time."""
    n = nonzero.clamp(min=1.0)
    density = (n / numel).clamp(max=1.0 - 1e-6)
    costs = [numel * bits, n * bits + numel]
    for width in INDEX_WIDTHS:
        r = (1 - density) ** (2 ** width)
        costs.append((n + n * r / (1 - r).clamp_min(1e-12)) * (bits + width))
    costs = torch.stack([torch.as_tensor(c, dtype=n.dtype) for c in costs])
    sparse = costs[1:].min()
    return (sparse + (costs.min() - sparse).detach()) / 8


def _quantizer(shape, per_channel=True, bits=4, seed=0, learn_bits=True, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).clamp(-2.5, 2.5)
    w.view(-1)[::17] = 0.0  # exact zeros (as behind a pruning mask)
    if outliers:
        w.view(-1)[5::41] *= 12.0  # beyond the grid's clipping range
    q = ZeroLevelLSQWeight(w, bits, per_channel, learn_bits=learn_bits, min_bits=2, max_bits=8)
    with torch.no_grad():
        q.dead_zone_raw.uniform_(-1.0, 1.5, generator=g)  # dead zones from 0.8 to 2.2 steps
        q.bits_raw.add_(0.3)
    return nn.Parameter(w), q


def _grads(value, q, w):
    params = [p for p in (w, q.log_step, q.dead_zone_raw, q.bits_raw) if p.requires_grad]
    return torch.autograd.grad(value, params, allow_unused=True)


def _close(a, b):
    assert (a is None) == (b is None)
    if a is not None:
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("shape,per_channel", [((7, 40), True), ((7, 40), False), ((6, 3, 3, 3), True)])
@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("outliers", [True, False])
def test_fused_quantizer_and_count_match_the_plain_formulas(shape, per_channel, fixed, outliers):
    w, q = _quantizer(shape, per_channel, outliers=outliers)
    q(w.detach())  # initialise the steps
    with torch.no_grad():
        q.log_step.add_(0.0 if outliers else 0.7)  # without outliers the steps fit 2.5 in the grid
    assert bool(((w / q.effective_step()).abs() > q.qmax).any()) == outliers  # both backward paths
    if fixed:
        q.fix_pattern(w.detach())
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out, ref = q(w), plain_forward(q, w)
    assert torch.equal(out, ref)  # the quantized weights are bit for bit the same
    assert not torch.signbit(out[out == 0]).any()  # pruned weights are +0.0, as the plain where() gives
    assert float(q.kept_count(w)) == float(q.soft_nonzero(w))
    # task alone, size alone (a fixed pattern's count is a constant), both
    for task_w, size_w in ((1.0, 0.0), (0.0, 1.0), (1.0, 0.01))[: 1 if fixed else 3]:
        got = _grads(task_w * (q(w) * probe).sum() + size_w * q.kept_count(w), q, w)
        want = _grads(task_w * (plain_forward(q, w) * probe).sum() + size_w * q.soft_nonzero(w), q, w)
        for a, b in zip(got, want):
            _close(a, b)


def test_the_count_of_a_stale_forward_is_not_used():
    w, q = _quantizer((5, 30))
    q(w)
    opt = torch.optim.Adam([w, q.log_step, q.dead_zone_raw], lr=0.5)
    q(w).sum().backward()
    opt.step()  # every in-place update moves a version counter: the last forward is stale now
    assert q.kept_count(w) is not q.last_count
    assert float(q.kept_count(w)) == float(q.soft_nonzero(w))
    with torch.no_grad():
        q(w)
    assert q.kept_count(w) is not q.last_count  # a forward without a graph gives no gradient
    with torch.no_grad():
        assert q.kept_count(w) is q.last_count  # ... but its value serves where no gradient is asked


@pytest.mark.parametrize("bits", [2.0, 4.0, 7.0])
def test_vectorized_byte_model_matches_the_per_format_loop(bits):
    counts = torch.tensor([1.0, 30.0, 900.0, 5_000.0, 19_500.0], requires_grad=True)
    numels = [40, 3_000, 4_000, 20_000, 20_000]
    b = torch.full((5,), bits, requires_grad=True)
    got = sparse_layer_bytes(counts, numels, b)
    want = torch.stack([plain_layer_bytes(counts[i], numels[i], b[i]) for i in range(5)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for a, c in zip(torch.autograd.grad(got.sum(), [counts, b]), torch.autograd.grad(want.sum(), [counts, b])):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-7)
    single = sparse_layer_bytes(counts[2].detach(), numels[2], b[2].detach())  # one layer, scalar inputs
    assert single.dim() == 0 and abs(float(single) - float(want[2])) <= 1e-5 * float(want[2])


def test_the_size_term_of_a_session_matches_the_plain_estimate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    session = prepare(model, {"techniques": [
        {"type": "quant_lsq", "bits": 4, "zero_level": True},
        {"type": "size_budget", "end": 0.6, "freeze": 0.8, "target_bytes": 150.0}],
        "training": {"epochs": 1, "batch_size": 8}}, total_steps=50)
    budget = next(t for t in session.techniques if t.kind == "size_budget")
    x, y = torch.randn(8, 20), torch.randint(0, 4, (8,))
    terms = session.loss(model(x), (x, y))
    plain = budget.scale * sum(plain_layer_bytes(q.soft_nonzero(m.parametrizations.weight.original),
                                                 m.weight.numel(), q.bits_ste())
                               for m, q in budget.layers.values()) + budget.fixed
    torch.testing.assert_close(budget.estimate(), plain, rtol=1e-6, atol=0)
    params = [p for _, q in budget.layers.values() for p in (q.log_step, q.dead_zone_raw, q.bits_raw)]
    params += [m.parametrizations.weight.original for m, _ in budget.layers.values()]
    got = torch.autograd.grad(budget.estimate(), params, retain_graph=True)
    want = torch.autograd.grad(plain, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert "size" in terms and terms["size"].requires_grad


def test_the_budget_reads_every_width_at_once_with_the_same_numbers_and_gradients():
    from jointcompress.recipe import SizeBudget as SizeBudgetConfig
    from jointcompress.techniques.size_budget import SizeBudget

    torch.manual_seed(0)
    budget = SizeBudget(SizeBudgetConfig(type="size_budget", target_bytes=1000.0))
    for i, (rows, cols, lo, hi) in enumerate([(4, 9, 2, 8), (3, 5, 3, 6), (2, 7, 2, 8)]):
        lin = nn.Linear(cols, rows)
        q = ZeroLevelLSQWeight(lin.weight.detach(), 4, min_bits=lo, max_bits=hi)
        with torch.no_grad():
            q.bits_raw.fill_(float(torch.randn(())))
        parametrize.register_parametrization(lin, "weight", q)
        budget.layers[f"l{i}"] = (lin, q)
    raws = [q.bits_raw for _, q in budget.layers.values()]
    weights = torch.tensor([1.0, 2.0, 3.0])
    fast, plain = budget.layer_bits(), torch.stack([q.bits_ste() for _, q in budget.layers.values()])
    assert torch.equal(fast, plain)
    for a, b in zip(torch.autograd.grad((fast * weights).sum(), raws), torch.autograd.grad((plain * weights).sum(), raws)):
        assert torch.equal(a, b) and float(a) != 0

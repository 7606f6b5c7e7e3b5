"""Learned per-layer bit-widths: held with hysteresis, priced on both sides, a change that moves
precision and not sparsity, frozen with the pattern, and stored by the artifact as learned."""
import copy

import pytest
import torch

from jointcompress.api import compress
from jointcompress.artifact.store import load_with_spec, save
from jointcompress.data import evaluator, load_digits
from jointcompress.finalize import finalize
from jointcompress.models import build_model
from jointcompress.pipeline import train_teacher
from jointcompress.recipe import parse_recipe
from jointcompress.techniques import learned_width as lw
from jointcompress.techniques.zero_level import ZeroLevelLSQWeight
from jointcompress.techniques.zero_level_kernel import qmax_of


def _push_relaxed_width(q: ZeroLevelLSQWeight, width: float) -> None:
    with torch.no_grad():
        q.bits_raw.fill_(lw.raw_of_width(width, q.min_bits, q.max_bits))


def _on_grid(q: ZeroLevelLSQWeight, w: torch.Tensor) -> None:
    ints = q(w).detach() / q.scale().view(-1, *([1] * (w.dim() - 1)))
    assert torch.equal(ints, ints.round())
    assert int(ints.abs().max()) <= qmax_of(q.bits)


def test_hysteresis_holds_the_width_on_a_rounding_boundary():
    assert lw.next_width(3.5, 3, 2, 8) == 3 and lw.next_width(3.74, 3, 2, 8) == 3  # inside the band
    assert lw.next_width(3.76, 3, 2, 8) == 4 and lw.next_width(2.2, 3, 2, 8) == 2
    assert lw.next_width(9.0, 8, 2, 8) == 8 and lw.next_width(1.0, 2, 2, 8) == 2  # never out of range
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    q = ZeroLevelLSQWeight(w, bits=3, min_bits=2, max_bits=6)
    q(w)
    for step in range(40):  # the relaxed width oscillates around 3.5, as it did on LeNet-300-100
        _push_relaxed_width(q, 3.5 + (0.2 if step % 2 else -0.2))
        q.width_step(w, batch_size=1)
    assert q.bits == 3 and q.width_changes == []
    _push_relaxed_width(q, 4.8)  # decided: past the band
    q.width_step(w, batch_size=1)
    assert q.bits == 5 and q.width_changes == [(3, 5)]


@pytest.mark.parametrize("new", [2, 3, 5, 8])
def test_a_width_change_moves_precision_not_sparsity(new):
    torch.manual_seed(1)
    w = torch.randn(12, 300) * torch.rand(12, 1)
    q = ZeroLevelLSQWeight(w, bits=4)
    with torch.no_grad():
        q.dead_zone_raw.fill_(0.8)  # t = 1.67 steps: about 10% of the weights kept
    kept = q(w).detach() != 0
    _push_relaxed_width(q, float(new))
    q.width_step(w, batch_size=1)
    assert q.bits == new
    _on_grid(q, w)
    after = q(w).detach() != 0
    if new > 4:  # a finer grid keeps exactly the same weights (the dead zone's edge is kept)
        assert torch.equal(after, kept)
    else:  # a coarser one can only lose those under its half step, never gain any
        assert not (after & ~kept).any() and after.sum() >= 0.9 * kept.sum()
    q.fix_pattern(w)  # frozen with the pattern: the width no longer moves
    _push_relaxed_width(q, 2.0 if new > 4 else 8.0)
    q.width_step(w, batch_size=1)
    assert q.bits == new and not q.bits_raw.requires_grad


def test_the_width_price_is_the_rounding_noise_of_the_integer_widths():
    # cost ~ 1 / Q(bits)^2 at a fixed range: from 4 to 3 bits the noise grows (7/3)^2 times
    assert lw.noise_cost_slope(1.0, 4, 3.8, 2, 8) == pytest.approx(1 - (7 / 3) ** 2)
    assert lw.noise_cost_slope(1.0, 4, 4.2, 2, 8) == pytest.approx((7 / 15) ** 2 - 1)
    assert lw.noise_cost_slope(1.0, 2, 1.9, 2, 8) == pytest.approx((1 / 3) ** 2 - 1)  # no width under min_bits
    torch.manual_seed(2)
    w = torch.randn(8, 64)
    q = ZeroLevelLSQWeight(w, bits=4)
    out = q(w)
    (out * torch.randn_like(out)).sum().backward()  # a task gradient: the Fisher estimate sees it
    q.bits_raw.grad = None
    q.width_step(w, batch_size=8)
    assert q.fisher.estimate() is not None and float(q.bits_raw.grad) < 0  # noise pulls the width up
    # and the quantizer itself gives the width no gradient (it is priced, not rounded through)
    q.bits_raw.grad = None
    q(w).sum().backward()
    assert q.bits_raw.grad is None


@pytest.fixture(scope="module")
def trained():
    split = load_digits()
    return split, train_teacher("lenet300", split, 3)


def test_learned_widths_land_in_range_and_the_artifact_stores_them(trained, tmp_path):
    split, teacher = trained
    recipe = parse_recipe({"model": "lenet300", "mode": "joint", "target": {"ratio": 40}, "techniques": [
        {"type": "quant_lsq", "bits": 4, "zero_level": True, "learn_bits": True, "min_bits": 2, "max_bits": 6},
        {"type": "size_budget", "end": 0.6, "freeze": 0.8},
        {"type": "distill_kd", "cache_teacher": True}],
        "training": {"epochs": 5, "batch_size": 16, "lr": 0.002}})
    model = copy.deepcopy(teacher)
    result = compress(model, recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test), teacher=teacher)
    quantizers = {n: q for t in result.techniques if t.kind == "quant_lsq" for n, q in t.quantizers.items()}
    learned = {n: q.bits for n, q in quantizers.items()}
    assert all(2 <= b <= 6 for b in learned.values())
    assert any(q.width_changes for q in quantizers.values())  # the widths did move in this run ...
    assert all(len(q.width_changes) <= 3 for q in quantizers.values())  # ... and did not chatter
    assert all(bool(q.pattern_fixed) and not q.bits_raw.requires_grad for q in quantizers.values())
    x = split.x_test[:64]
    masked = model(x).detach()
    spec = finalize(model, result.example_inputs)
    save(model, spec, tmp_path / "a", example_inputs=result.example_inputs)
    loaded, loaded_spec = load_with_spec(tmp_path / "a", lambda: build_model("lenet300", split.image_size, split.num_classes))
    assert {n: loaded_spec.layers[n].bits for n in learned} == learned  # the file's widths are the learned ones
    torch.testing.assert_close(loaded(x), masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_the_noise_price_reads_the_forward_gate_exactly(compiled):
    """width_step counts the kept weights with the gate of the step's forward pass and prices them
    with its stored step instead of deriving them again: the same price, bit for bit, as from the
    weights and parameters themselves."""
    grads = []
    for reuse in (True, False):
        torch.manual_seed(3)
        w = torch.nn.Parameter(torch.randn(16, 48))
        q = ZeroLevelLSQWeight(w.detach(), bits=4)
        q.compiled = compiled
        out = q(w)
        assert (q.last_gate is not None) and torch.equal(q.last_gate.bool(), q.hard_keep(w))
        (out * torch.randn_like(out)).sum().backward()
        q.width_step(w, batch_size=4)  # the first call only starts the estimate
        out = q(w)
        (out * torch.randn_like(out)).sum().backward()
        assert torch.equal(q.last_step, q.effective_step().detach())  # the forward's step is effective_step's
        if not reuse:
            q.last_gate = q.last_step = None
        q.bits_raw.grad = None
        q.width_step(w, batch_size=4)
        grads.append(q.bits_raw.grad.clone())
    assert torch.equal(grads[0], grads[1]) and float(grads[0]) != 0


def test_a_gradient_never_folded_is_dropped_by_the_next_forward():
    """A step skipped after a non-finite gradient never folds what its hook caught: the next
    step's Fisher estimate must not inherit it."""
    torch.manual_seed(4)
    w = torch.nn.Parameter(torch.randn(6, 20))
    q = ZeroLevelLSQWeight(w.detach(), bits=4)
    out = q(w)
    (out * float("inf")).sum().backward()  # the skipped step: caught, never folded
    assert q.fisher.pending is not None and not torch.isfinite(q.fisher.pending).all()
    out = q(w)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    assert torch.equal(q.fisher.pending, g)
    q.width_step(w, batch_size=2)
    assert torch.isfinite(q.fisher.estimate()).all()


@pytest.mark.parametrize("zero_level", [False, True])
def test_the_forward_input_is_not_registered_as_state(zero_level):
    """The quantizer keeps its forward's input (the layer's weight Parameter) as a plain
    attribute: the weight is in the state dict once, and states saved when it was registered
    (under last_in / last_w) still load."""
    from jointcompress.techniques.quant_lsq import LSQWeight

    torch.manual_seed(5)
    layer = torch.nn.Linear(20, 6)
    q = ZeroLevelLSQWeight(layer.weight.detach(), bits=4) if zero_level else LSQWeight(layer.weight.detach(), bits=4)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", q)
    out = layer(torch.randn(3, 20))
    assert q.last_in is layer.parametrizations.weight.original
    keys = set(layer.state_dict())
    assert not any(k.endswith((".last_in", ".last_w")) for k in keys)
    assert sum(1 for p in layer.parameters() if p.shape == (6, 20)) == 1
    old = dict(layer.state_dict())
    old["parametrizations.weight.0.last_in"] = old["parametrizations.weight.original"].clone()
    if zero_level:
        old["parametrizations.weight.0.last_w"] = old["parametrizations.weight.original"].clone()
    layer.load_state_dict(old)  # strict: the old entries are dropped, not unexpected
    assert torch.equal(layer(torch.zeros(1, 20)), layer(torch.zeros(1, 20))) and out.shape == (3, 6)


def test_the_step_multiplier_follows_the_held_width_in_copies_too():
    """The multiplier is computed once per held width: a width change, and a change in a deep
    copy (whose buffers restart their version counters), each get their own."""
    import copy

    torch.manual_seed(6)
    w = torch.randn(8, 30)
    q = ZeroLevelLSQWeight(w, bits=4)
    fresh = lambda m: qmax_of(float(m.ref_bits)) / qmax_of(m.held_bits.to(m.log_step.dtype))  # noqa: E731
    assert torch.equal(q.step_multiplier(), fresh(q))
    twin = copy.deepcopy(q)
    with torch.no_grad():
        twin.held_bits.fill_(6)
    assert torch.equal(twin.step_multiplier(), fresh(twin)) and not torch.equal(twin.step_multiplier(), q.step_multiplier())
    assert torch.equal(q.step_multiplier(), fresh(q))
    _push_relaxed_width(q, 2.0)
    q(w)
    q.width_step(w, batch_size=1)
    assert q.bits == 2 and torch.equal(q.step_multiplier(), fresh(q))


@pytest.mark.parametrize("fmt", ["fp16", "log8", "fp32"])
@pytest.mark.parametrize("held", [2, 3, 5, 8])
def test_the_forward_step_is_effective_step_at_every_width(fmt, held):
    torch.manual_seed(held)
    w = torch.randn(10, 24) * 0.1
    q = ZeroLevelLSQWeight(w, bits=4)
    q.step_format = fmt
    with torch.no_grad():
        q.held_bits.fill_(held)
        q.log_step.add_(torch.randn_like(q.log_step))
    for compiled in (False, True):
        q.compiled = compiled
        q(w)
        assert torch.equal(q.last_step, q.effective_step().detach())
        assert torch.equal(q.last_dead_zone, q.dead_zone().detach())  # what the saliency reuses


@pytest.mark.parametrize("saliency", [False, True])
def test_the_width_alone_folds_every_fisher_every_th_gradient_with_the_decay_of_as_many_steps(saliency):
    """Where only the width's price reads the estimate, it takes the first gradient it sees, then
    one step's in FISHER_EVERY, decayed by FISHER_DECAY ** FISHER_EVERY: the same ~50-step average,
    fewer passes. Where the size budget's saliency weighs each weight by it, every step's."""
    torch.manual_seed(5)
    w = torch.nn.Parameter(torch.randn(4, 10))
    q = ZeroLevelLSQWeight(w.detach(), bits=4)
    q.fisher_for_saliency = saliency
    every = 1 if saliency else lw.FISHER_EVERY
    decay = lw.FISHER_DECAY ** every
    expected, folds = None, []
    for step in range(1, 3 * lw.FISHER_EVERY + 2):
        out = q(w)
        g = torch.randn_like(out)
        (out * g).sum().backward()
        before = q.fisher.value.clone()
        q.width_step(w, batch_size=2, step=step)
        if not torch.equal(q.fisher.value, before):
            folds.append(step)
            expected = 2 * g * g if expected is None else decay * expected + (1 - decay) * 2 * g * g
        assert not q.fisher.fold(batch_size=2, step=step)  # once a step
    assert folds == [1] + [s for s in range(2, 3 * lw.FISHER_EVERY + 2) if s % every == 0]
    torch.testing.assert_close(q.fisher.estimate(), expected)


def test_the_noise_price_is_computed_when_the_estimate_moves_and_resumes_with_the_state():
    """Between folds the width is priced with the noise computed at the last fold (kept in the
    quantizer's state): a copy loaded from that state prices the next step exactly as the original."""
    torch.manual_seed(6)
    w = torch.nn.Parameter(torch.randn(8, 32))
    q = ZeroLevelLSQWeight(w.detach(), bits=4)

    def step(layer, s):
        out = layer(w)
        (out * torch.randn_like(out, generator=torch.Generator().manual_seed(s))).sum().backward()
        layer.bits_raw.grad = None
        layer.width_step(w, batch_size=4, step=s)
        return float(layer.bits_raw.grad), float(layer.width_noise)

    _, noise_at_fold = step(q, lw.FISHER_EVERY)
    with torch.no_grad():
        q.dead_zone_raw.add_(0.5)  # fewer kept weights: a noise computed now would be smaller
    grad, noise = step(q, lw.FISHER_EVERY + 1)  # no fold: the noise of the last fold prices the step
    assert noise == noise_at_fold and grad != 0
    resumed = ZeroLevelLSQWeight(w.detach(), bits=4)
    resumed.load_state_dict(q.state_dict())
    assert step(resumed, lw.FISHER_EVERY + 2) == step(q, lw.FISHER_EVERY + 2)
    _, refreshed = step(q, 2 * lw.FISHER_EVERY)  # the next fold prices the kept weights as they are
    assert refreshed != noise_at_fold

"""The compiled zero-level kernels (quant_lsq.compile) compute what the eager kernel computes.

The forward pass must give the same quantized weights and kept-weight count bit for bit (runs
with and without compiling evaluate, encode and prune the same weights), the gradients must
agree to float rounding, and a short training run must follow the eager run's trajectory.
Compiling costs seconds, so every compiled call here uses 2-D layers of more than 4096 weights
(one kernel per pass and pattern mode, shared by all tests of the module).
"""
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from jointcompress import prepare
from jointcompress.techniques import zero_level_compiled
from jointcompress.techniques.saliency import FisherSaliency
from jointcompress.techniques.zero_level import ZeroLevelLSQWeight


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny layers: one intra-op thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quantizer(shape, seed, outliers):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).clamp(-2.5, 2.5)
    w.view(-1)[::17] = 0.0
    if outliers:
        w.view(-1)[5::41] *= 12.0  # beyond the grid's clipping range
    q = ZeroLevelLSQWeight(w, 4, True, min_bits=2, max_bits=8)
    q(w)  # initialise the steps
    with torch.no_grad():
        q.dead_zone_raw.uniform_(-1.0, 1.5, generator=g)
        q.bits_raw.add_(0.3)
        q.log_step.add_(0.0 if outliers else 0.7)
    return w, q


def _pair(shape=(48, 120), seed=0, outliers=True):
    """The same quantizer twice (eager, compiled) and a weight with zeros, outliers and both
    sides of every dead zone."""
    w, eager = _quantizer(shape, seed, outliers)
    _, fast = _quantizer(shape, seed, outliers)
    fast.compiled = True
    return nn.Parameter(w), eager, fast


def _grads(value, q, w):
    # not bits_raw: the quantizer treats the held width as a constant (techniques/learned_width.py)
    params = [p for p in (w, q.log_step, q.dead_zone_raw) if p.requires_grad]
    return torch.autograd.grad(value, params)


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("outliers", [True, False])
def test_compiled_kernel_matches_the_eager_one(fixed, outliers):
    w, eager, fast = _pair(outliers=outliers)
    if fixed:
        eager.fix_pattern(w.detach())
        fast.fix_pattern(w.detach())
    out_e, out_c = eager(w), fast(w)
    assert torch.equal(out_e, out_c)  # the quantized weights, bit for bit
    assert not torch.signbit(out_c[out_c == 0]).any()  # pruned weights are +0.0
    assert float(eager.last_count.detach()) == float(fast.last_count.detach()) > 0
    probe = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    for task_w, size_w in ((1.0, 0.0), (0.0, 1.0), (1.0, 0.01))[: 1 if fixed else 3]:
        want = _grads(task_w * (eager(w) * probe).sum() + size_w * eager.kept_count(w), eager, w)
        got = _grads(task_w * (fast(w) * probe).sum() + size_w * fast.kept_count(w), fast, w)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_compiled_kernel_rounds_log8_steps_as_the_eager_one():
    """log8 steps (scale_format auto under a size target) in the compiled kernels: the same stored steps
    and quantized weights bit for bit, else the writer would find no exact log8 code and store fp16."""
    w, eager, fast = _pair()
    eager.step_format = fast.step_format = "log8"
    assert torch.equal(eager(w), fast(w)) and torch.equal(eager.scale(), fast.scale())
    from jointcompress.artifact.precision import log8_code, log8_value

    assert torch.equal(log8_value(log8_code(fast.scale())), fast.scale())  # on the grid 2**(k/16)


def _run(compile_mode, steps=60):
    """A size-budgeted joint run of `steps` steps (the freeze at 80%: both pattern modes)."""
    if compile_mode:  # kernels compiled by earlier tests under another thread count sum in another order
        zero_level_compiled.forget_kernels()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 64), nn.ReLU(), nn.Linear(64, 70))
    recipe = {"techniques": [
        {"type": "quant_lsq", "bits": 4, "zero_level": True, "compile": compile_mode, "zero_level_lr": 0.02},
        {"type": "size_budget", "end": 0.6, "freeze": 0.8, "target_bytes": 1500.0, "calibrate_every": 20}],
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.01}, "coordination": {"strategy": "pcgrad", "every": 10}}
    session = prepare(model, recipe, total_steps=steps)
    opt = torch.optim.Adam(session.param_groups())
    session.bind(opt)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(32, 80, generator=g), torch.randint(0, 70, (32,), generator=g)
        terms = session.loss(model(x), (x, y))
        opt.zero_grad()
        session.backward(terms)
        session.before_step()
        opt.step()
        session.after_step()
    quantizers = [m.parametrizations.weight[0] for m in model if hasattr(m, "parametrizations")]
    return model, quantizers


def test_a_compiled_run_follows_the_eager_trajectory():
    # the same trajectory to 1e-6 needs the same summation order as a fresh compile under one known
    # thread count, and a process no other test has run in: twice in many full-suite runs (once on a
    # branch that called the kernels without TorchDynamo, once on this code under pytest-xdist), each
    # time after other tests in the same process, the runs split beyond rounding; never alone, nor in
    # 20 runs of this comparison in one process with other allocations between them. The cause is not
    # found, so it runs in a fresh interpreter, as it does alone.
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(1); "
            "import torch._inductor.config as c; import test_zero_level_compiled as t; "
            "c.fx_graph_cache = False; t._compare_trajectories()")
    here = str(Path(__file__).resolve().parent)
    done = subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _compare_trajectories():
    eager_model, eager_q = _run(False)
    fast_model, fast_q = _run(True)
    assert all(q.compiled for q in fast_q) and not any(q.compiled for q in eager_q)
    # every kernel call went direct (traced_kernel.py): torch.compile's kernels were never built
    assert zero_level_compiled._STATE["kernels"] is None and not zero_level_compiled._STATE["broken"]
    assert all(bool(q.pattern_fixed) for q in fast_q)  # the run crossed the freeze
    for (name, a), (_, b) in zip(eager_model.state_dict().items(), fast_model.state_dict().items()):
        # float rounding: the compiled backward sums per channel in another order (~1e-7 relative a
        # step), and the difference grows along the run (up to 1.6e-6 on a weight of 0.45 here)
        assert a.dtype != torch.float32 or torch.allclose(a, b, rtol=1e-5, atol=2e-6), name
    with torch.no_grad():
        for a, b in zip(eager_model, fast_model):
            if hasattr(a, "weight"):
                assert torch.equal(a.weight, b.weight)  # the quantized weights the run ends with


def test_the_compiled_saliency_gradient_matches_the_eager_one():
    """The size budget's Fisher saliency (saliency.py) on the dead zones: one compiled pass."""
    w, eager, fast = _pair(seed=4)
    fisher = torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) * 3
    for q in (eager, fast):
        q.width_fisher.copy_(fisher)
        q.width_fisher_seen.fill_(True)
    sal = FisherSaliency(30.0)
    layers = [{"fc": (SimpleNamespace(parametrizations=SimpleNamespace(weight=SimpleNamespace(original=w))), q)}
              for q in (eager, fast)]
    for layer in layers:
        sal.add_gradient(layer)
    assert eager.dead_zone_raw.grad.abs().max() > 0
    torch.testing.assert_close(fast.dead_zone_raw.grad, eager.dead_zone_raw.grad, rtol=2e-5, atol=1e-5)
    # the compiled kernel really ran (an earlier test's config patch once broke every compile after
    # it, and this test then compared the eager gradient with itself)
    assert not zero_level_compiled._STATE["broken"] and zero_level_compiled._direct_kernels()[3]._variants


def test_auto_compiles_only_long_runs():
    assert not zero_level_compiled.wants_compiled("auto", zero_level_compiled.AUTO_MIN_STEPS - 1)
    assert zero_level_compiled.wants_compiled("auto", zero_level_compiled.AUTO_MIN_STEPS)
    assert zero_level_compiled.wants_compiled(True, 1) and not zero_level_compiled.wants_compiled(False, 10 ** 9)
    for steps, want in ((50, False), (zero_level_compiled.AUTO_MIN_STEPS, True)):
        model = nn.Sequential(nn.Linear(8, 4))
        prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True}]}, total_steps=steps)
        assert model[0].parametrizations.weight[0].compiled is want
    plain = nn.Sequential(nn.Linear(8, 4))  # plain LSQ has no compiled kernel
    prepare(plain, {"techniques": [{"type": "quant_lsq", "bits": 4, "compile": True}]}, total_steps=10)
    assert not getattr(plain[0].parametrizations.weight[0], "compiled", False)


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(monkeypatch):
    w, eager, fast = _pair(seed=5)

    def broken():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(zero_level_compiled, "_STATE", {"kernels": None, "direct": None, "broken": False})
    monkeypatch.setattr(zero_level_compiled, "_kernels", broken)
    monkeypatch.setattr(zero_level_compiled, "_direct_kernels", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fast(w)
        grads = _grads(out.sum() + 0.01 * fast.kept_count(w), fast, w)
        out2 = fast(w)  # later calls go straight to eager, without a second warning
    assert sum("quant_lsq.compile" in str(c.message) for c in caught) == 1
    assert torch.equal(out, eager(w)) and torch.equal(out2, out)
    want = _grads(eager(w).sum() + 0.01 * eager.kept_count(w), eager, w)
    for a, b in zip(grads, want):
        assert torch.equal(a, b)  # the eager kernel itself
    assert math.isfinite(float(out.sum()))


def test_a_kernel_that_cannot_be_traced_runs_through_torch_compile(monkeypatch):
    w, eager, fast = _pair(seed=7)

    def untraceable():
        raise RuntimeError("make_fx cannot trace this")

    monkeypatch.setattr(zero_level_compiled, "_direct_kernels", untraceable)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the torch.compile path is the same kernel: no warning
        # torch's own deprecation of torch.jit on its first compile in a process (alone, this test is that first)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        out = fast(w)
        grads = _grads(out.sum() + 0.01 * fast.kept_count(w), fast, w)
    assert zero_level_compiled._STATE["kernels"] is not None  # it did run through torch.compile
    assert torch.equal(out, eager(w))
    want = _grads(eager(w).sum() + 0.01 * eager.kept_count(w), eager, w)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_a_backward_without_its_compiled_kernel_recomputes_eagerly(monkeypatch):
    w, eager, fast = _pair(seed=6)
    out = fast(w)  # compiled forward: only w is kept for the backward
    monkeypatch.setitem(zero_level_compiled._STATE, "broken", True)
    got = _grads(out.sum() + 0.01 * fast.kept_count(w), fast, w)
    want = _grads(eager(w).sum() + 0.01 * eager.kept_count(w), eager, w)
    for a, b in zip(got, want):
        assert torch.equal(a, b)

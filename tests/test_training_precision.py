"""training.precision: bf16 / fp16 run the built-in loop's training forward in 16-bit autocast (fp16 with a
loss scaler); the weights, the optimizer and evaluation stay float32 (resuming in another precision:
test_resume.py)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from jointcompress import compress
from jointcompress.data import evaluator
from jointcompress.errors import RecipeError
from jointcompress.recipe import Recipe


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.relu(nn.functional.max_pool2d(self.conv(x), 2)).flatten(1))


def _recipe(precision: str, epochs: int = 2) -> dict:
    return {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5},
                           {"type": "quant_lsq", "bits": 4},
                           {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}],
            "training": {"epochs": epochs, "batch_size": 128, "precision": precision}}


def _images(digits):
    return digits.x_train.reshape(-1, 1, 8, 8), digits.x_test.reshape(-1, 1, 8, 8)


def _run(digits, precision: str, recipe: dict | None = None, **kw):
    torch.manual_seed(0)
    teacher, model = SmallCNN(), SmallCNN()
    model.load_state_dict(teacher.state_dict())
    dtypes = {"train": set(), "eval": set()}
    model.conv.register_forward_hook(lambda m, i, out: dtypes["train" if m.training else "eval"].add(out.dtype))
    x_train, x_test = _images(digits)
    result = compress(model, recipe or _recipe(precision, kw.pop("epochs", 2)), (x_train, digits.y_train),
                      evaluator(x_test, digits.y_test), teacher=teacher, **kw)
    return result, model, dtypes


@pytest.mark.parametrize("precision, trained", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_training_forward_runs_in_the_recipes_precision_and_evaluation_in_float32(digits, precision, trained):
    result, model, dtypes = _run(digits, precision)
    assert dtypes["train"] == {trained} and dtypes["eval"] == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    spec = result.finalize()
    x_test = _images(digits)[1]
    assert abs(float((model.conv.weight == 0).float().mean()) - 0.5) < 0.02  # the masks reached their target
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and spec is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        assert model(x_test[:4]).dtype == torch.float32


def test_precision_is_checked_by_name():
    with pytest.raises(Exception, match="precision"):
        Recipe.model_validate(_recipe("fp8"))
    from jointcompress.training.mixed_precision import check_precision

    with pytest.raises(RecipeError, match="training.precision: bf16.*meta"):
        check_precision(nn.Linear(2, 2, device="meta"), "bf16")
    check_precision(nn.Linear(2, 2, device="meta"), "fp32")  # float32 goes anywhere


def test_bf16_on_a_cpu_without_bfloat16_instructions_warns(monkeypatch):
    from jointcompress.training.mixed_precision import check_precision

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": False, "amx_bf16": False})
    with pytest.warns(RuntimeWarning, match="bf16 on a CPU without bf16 instructions"):
        check_precision(nn.Linear(2, 2), "bf16")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_precision(nn.Linear(2, 2), "bf16")


def _scaler_from(monkeypatch, **settings):
    """The loop's fp16 GradScaler with these settings (its defaults start at 65,536 and double every 2,000 steps)."""
    import jointcompress.training.loop as loop

    monkeypatch.setattr(loop, "loss_scaler", lambda model, precision: torch.amp.GradScaler("cpu", **settings)
                        if precision == "fp16" else None)


def test_fp16_steps_the_scale_overflowed_are_the_scalers_skips_not_a_diverging_run(digits, monkeypatch):
    """A scale near float32's largest number overflows the first steps' gradients: each is skipped with the
    scale halved, as GradScaler does; the non-finite recovery (rollback, half the LR, stop after 3) stays out."""
    _scaler_from(monkeypatch, init_scale=3e38)
    result, model, dtypes = _run(digits, "fp16")
    events = [e for e in result.history.events if e["event"] in ("loss_scale_overflow", "nonfinite")]
    assert events and {e["event"] for e in events} == {"loss_scale_overflow"}
    assert [e["scale"] for e in events] == pytest.approx([3e38 * 0.5 ** (i + 1) for i in range(len(events))], rel=1e-6)
    assert dtypes["train"] == {torch.float16} and all(torch.isfinite(p).all() for p in model.parameters())
    assert abs(float((model.conv.weight == 0).float().mean()) - 0.5) < 0.02


def test_an_fp16_run_resumes_with_its_loss_scale(digits, tmp_path, monkeypatch):
    _scaler_from(monkeypatch, init_scale=1024.0, growth_interval=1)  # the scale doubles every clean step

    class Crash(Exception):
        pass

    class Scales:
        def __init__(self, crash_at=None):
            self.seen, self.crash_at = [], crash_at

        def on_step(self, trainer, step, out):
            self.seen.append(trainer.scaler.get_scale())
            if step == self.crash_at:
                raise Crash

    first = Scales(crash_at=13)
    with pytest.raises(Crash):
        _run(digits, "fp16", run_dir=tmp_path, checkpoint_every=5, callbacks=[first])
    then = Scales()
    result, _, _ = _run(digits, "fp16", run_dir=tmp_path, checkpoint_every=5, resume=True, callbacks=[then])
    resumed = next(e["step"] for e in result.history.events if e["event"] == "resumed")
    # the first resumed step starts from the scale the checkpoint held (after its step resumed - 1), not from 1,024
    assert then.seen[0] in (2 * first.seen[resumed - 1], first.seen[resumed - 1] / 2), (then.seen[0], first.seen)
    assert then.seen[0] > 4096


def test_the_fp16_scale_is_exact_under_pcgrad_and_micro_batches(digits, monkeypatch):
    """With the forward left in float32, fp16's loss scale (a power of two) must change nothing: PCGrad resolves
    the scaled per-term gradients of the step's micro-batches, which the loop settles before it unscales (after,
    the settled scaled sum would have replaced unscaled gradients)."""
    import contextlib

    import jointcompress.training.loop as loop

    monkeypatch.setattr(loop, "forward_precision", lambda model, precision: contextlib.nullcontext())
    _scaler_from(monkeypatch, init_scale=2.0 ** 10, growth_interval=10_000)
    trained = {}
    for precision in ("fp32", "fp16"):
        recipe = {**_recipe(precision, epochs=1), "mode": "joint", "target": {"ratio": 6},  # a size term against accuracy
                  "coordination": {"strategy": "pcgrad", "every": 1}}
        recipe["techniques"] = [{k: v for k, v in t.items() if k not in ("sparsity", "end")} for t in recipe["techniques"]]
        recipe["training"] = {**recipe["training"], "micro_batches": 2, "optimizer": "sgd", "lr": 0.05}  # Adam hides a scale
        result, model, _ = _run(digits, precision, recipe=recipe)
        assert not [e for e in result.history.events if e["event"] in ("loss_scale_overflow", "nonfinite")]
        trained[precision] = model.state_dict()
    for name, value in trained["fp32"].items():
        torch.testing.assert_close(trained["fp16"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_fp16_gradients_that_overflow_unscaled_are_the_recoverys_rollbacks(digits, monkeypatch):
    """At a scale of 1 an inf gradient is no overflow of the scale: the run rolls back and, at the third such
    step, stops naming the parameter (the scaler's step is ended each time, so its next unscale_ works)."""
    from jointcompress.errors import TrainingError

    _scaler_from(monkeypatch, init_scale=1.0)
    torch.manual_seed(0)
    teacher, model = SmallCNN(), SmallCNN()
    model.fc.bias.register_hook(lambda g: g * float("inf"))
    x_train, x_test = _images(digits)
    with pytest.raises(TrainingError, match=r"step 2: the gradient of parameter 'fc\.parametrizations\.bias.*non-finite step 3 of"):
        compress(model, _recipe("fp16"), (x_train, digits.y_train), evaluator(x_test, digits.y_test), teacher=teacher)

"""training.precision: bf16 runs the built-in loop's training forward in bfloat16 autocast; the weights,
the optimizer and evaluation stay float32 (resuming in the other precision: test_resume.py)."""
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


def _run(digits, precision: str, **kw):
    torch.manual_seed(0)
    teacher, model = SmallCNN(), SmallCNN()
    model.load_state_dict(teacher.state_dict())
    dtypes = {"train": set(), "eval": set()}
    model.conv.register_forward_hook(lambda m, i, out: dtypes["train" if m.training else "eval"].add(out.dtype))
    x_train, x_test = _images(digits)
    result = compress(model, _recipe(precision, kw.pop("epochs", 2)), (x_train, digits.y_train),
                      evaluator(x_test, digits.y_test), teacher=teacher, **kw)
    return result, model, dtypes


@pytest.mark.parametrize("precision, trained", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
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
        Recipe.model_validate(_recipe("fp16"))
    from jointcompress.training.mixed_precision import check_precision

    with pytest.raises(RecipeError, match="training.precision: bf16.*meta"):
        check_precision(nn.Linear(2, 2, device="meta"), "bf16")
    check_precision(nn.Linear(2, 2, device="meta"), "fp32")  # float32 goes anywhere


def test_bf16_on_a_cpu_without_bfloat16_instructions_warns(monkeypatch):
    from jointcompress.training.mixed_precision import check_precision

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": False, "amx_bf16": False})
    with pytest.warns(RuntimeWarning, match="without bfloat16 instructions"):
        check_precision(nn.Linear(2, 2), "bf16")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_precision(nn.Linear(2, 2), "bf16")

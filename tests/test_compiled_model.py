"""A model the user compiles (torch.compile) trains on the grid the artifact stores."""
import pytest
import torch
import torch.nn as nn

import jointcompress
from jointcompress.artifact.precision import fp16_values
from jointcompress.coordination import GradientCoordinator
from jointcompress.errors import JointCompressError
from jointcompress.recipe import Coordination


def test_fp16_rounding_is_the_cast_under_torch_compile():
    """Inductor folds a cast to fp16 and back into nothing; the arithmetic rounding used while
    compiling gives the cast's values, subnormals and ties included."""
    g = torch.Generator().manual_seed(0)
    x = torch.exp(torch.empty(200_000).uniform_(-17.5, 11.08, generator=g))
    x = torch.cat([x, -x, torch.tensor([2.0 ** -24, 65504.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 0.0])])
    assert torch.equal(torch.compile(fp16_values)(x), x.to(torch.float16).float())
    wide = x.double()  # inductor's C++ for a float64 frexp did not build
    assert torch.equal(torch.compile(fp16_values)(wide), wide.to(torch.float16).double())


def test_a_compiled_model_computes_what_the_eager_one_does():
    """LSQ's step is rounded to fp16 as stored; compiled, that rounding vanished and 6,399 of 8,192
    4-bit weights of a layer sat on other levels than the artifact's (logits off by 0.1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(16, 1, 8, 8)
    jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, total_steps=10,
                          example_inputs=x[:2])
    with torch.no_grad():
        assert torch.equal(torch.compile(model)(x), model(x))


class _DonatingBackward(torch.autograd.Function):
    """Stands for a compiled graph whose backward donates its buffers."""

    @staticmethod
    def forward(ctx, w):
        return w.sum()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("This backward function was compiled with non-empty donated buffers which requires "
                           "create_graph=False and retain_graph=False.")


def test_a_measured_step_on_a_graph_that_donates_buffers_names_the_setting():
    """It was torch's RuntimeError from deep inside autograd, at the first measured step."""
    w = nn.Parameter(torch.ones(3))
    coordinator = GradientCoordinator(Coordination(strategy="pcgrad"), {"all": [w]})
    terms = {"task": _DonatingBackward.apply(w), "size": (w * 2).sum()}
    with pytest.raises(JointCompressError, match=r"donated_buffer = False"):
        coordinator.backward(terms, step=0)

"""The analytic layer-size estimate agrees with the real encoder on random layers."""
import pytest
import torch
import torch.nn as nn

from jointcompress.artifact.encode import encode_model
from jointcompress.artifact.estimate import estimate_layer_bytes
from jointcompress.artifact.store import file_blob
from jointcompress.spec import CompressionSpec, LayerSpec


def _random_layer(out_f, in_f, density, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    qmax = 2 ** (bits - 1) - 1
    layer = nn.Linear(in_f, out_f)
    mags = torch.randint(1, qmax + 1, (out_f, in_f), generator=g)
    signs = torch.where(torch.rand(out_f, in_f, generator=g) < 0.5, -1, 1)
    keep = torch.rand(out_f, in_f, generator=g) < density
    scale = (torch.rand(out_f, generator=g) * 0.05 + 0.01).half().float()
    with torch.no_grad():
        layer.weight.copy_((mags * signs * keep).float() * scale[:, None])
        layer.bias.copy_(torch.randn(out_f, generator=g).half().float())
    model = nn.Sequential(layer)
    return model, CompressionSpec(layers={"0": LayerSpec(bits, scale)}), int(keep.sum())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("density", [0.005, 0.02, 0.1, 0.5, 1.0])
def test_estimate_within_3_percent_of_the_encoder(bits, density):
    model, spec, nnz = _random_layer(300, 784, density, bits)
    real = len(file_blob(encode_model(model, spec))) - 4 - 1 - 4  # minus magic, part count, CRC
    est = estimate_layer_bytes(300 * 784, nnz, bits, 300, True)
    assert abs(est / real - 1) <= 0.03, (est, real)


def test_estimate_is_differentiable_in_the_kept_count():
    k = torch.tensor(2000.0, requires_grad=True)
    est = estimate_layer_bytes(100_000, k, 4, 100, True)
    est.backward()
    assert k.grad is not None and k.grad > 0  # keeping more weights costs bytes

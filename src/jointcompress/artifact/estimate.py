"""A cheap, analytic (and differentiable) estimate of one layer's bytes in the artifact.

The exact size comes from encoding (`targets.Candidate.file_bytes`); this is for places that
cannot afford to encode, e.g. a size term in the training loss. It follows what the encoder
does for a layer whose kept positions look random and whose kept values are spread over the
grid (layer_codec.py, entropy.py):

    p        = nonzero / numel                      (density)
    H2(p)    = -p log2 p - (1-p) log2 (1-p)         (bits per position of an ideal mask code)
    Hv       = log2(2**bits - 2)                     (bits per kept value: the non-zero levels)
    values   = min(nonzero * bits / 8,  nonzero * Hv / 8 + 2**bits + 5)      raw or ans
    indices  = min(numel / 8,           numel * H2(p) / 8 + 8)               bitmask raw or ans
    dense    = min(numel * bits / 8,    numel * (H2(p) + p * Hv) / 8 + 2**bits + 5)
    weights  = min(values + indices, dense)
    scales   = 2 * channels (fp16) | 2 + channels (log8) | 4 * channels (fp32)
    bias     = 2 * channels (fp16) | 4 * channels (fp32) | 1 * channels (int, typical) if has_bias
    total    = weights + scales + bias + 2 bytes of container index per part

The `+ 2**bits + 5` terms are the stored symbol histogram and the last rANS word. Real trained
layers have structure (whole rows or input pixels pruned, values peaked near the grid's middle)
that the coder exploits, so for them this is an upper bound; on random layers it is within 3%
of the encoder (tests/test_estimate.py).
"""
from __future__ import annotations

import math

import torch

SCALE_BYTES = {"fp16": lambda c: 2 * c, "log8": lambda c: 2 + c, "fp32": lambda c: 4 * c}
BIAS_BYTES = {"fp16": 2, "fp32": 4, "int": 1}
CONTAINER_BYTES_PER_PART = 2


def _h2(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-12, 1 - 1e-12)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


def estimate_layer_bytes(numel: int, nonzero, bits: int, channels: int, has_bias: bool,
                         scale_format: str = "fp16", bias_format: str = "fp16"):
    """Estimated stored bytes of one quantized layer (weights, scales, bias, index entries).

    `nonzero` may be a float or a torch tensor (then the result is a tensor, differentiable
    in `nonzero`); everything else is a plain number.
    """
    as_tensor = isinstance(nonzero, torch.Tensor)
    k = nonzero.double() if as_tensor else torch.tensor(float(nonzero), dtype=torch.float64)
    n = float(numel)
    p = k / max(n, 1.0)
    hv = math.log2(max(2 ** bits - 2, 2))
    table = 2 ** bits + 5
    big = torch.tensor(float("inf"), dtype=torch.float64)
    values = torch.minimum(k * bits / 8, k * hv / 8 + table)
    indices = torch.minimum(torch.tensor(n / 8, dtype=torch.float64), n * _h2(p) / 8 + 8)
    dense = torch.minimum(torch.tensor(n * bits / 8, dtype=torch.float64), n * (_h2(p) + p * hv) / 8 + table)
    weights = torch.minimum(torch.where(k < n, values + indices, big), dense)
    side = SCALE_BYTES[scale_format](channels) + (BIAS_BYTES[bias_format] * channels if has_bias else 0)
    parts = 3 + int(has_bias)
    total = weights + side + CONTAINER_BYTES_PER_PART * parts
    return total if as_tensor else float(total)

"""What the weights file will cost, as training stands: the differentiable estimate the size
budget trains against (`sparse_layer_bytes`) and the real file it is calibrated on
(`measured_bytes`, the artifact writer itself run on a finalized copy)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

INDEX_WIDTHS = tuple(range(2, 9))


def sparse_layer_bytes(nonzero: torch.Tensor, numel, bits: torch.Tensor) -> torch.Tensor:
    """Values + positions of one layer in the cheapest format the artifact writer offers.

    dense: numel * bits; bitmask: nonzero * bits + numel; relative indices of width w:
    (nonzero + fillers) * (bits + w), a filler for every gap of 2^w zeros or more, with gaps
    as between randomly placed weights at this density. The value is the cheapest format's;
    the gradient is the cheapest *sparse* format's, so a layer still stored dense (whose bytes do
    not depend on how many weights it keeps) feels what each kept weight will cost once it is
    sparse -- with the dense format's zero gradient, dense layers never started to prune.

    Vectorized: `nonzero`, `numel` and `bits` may be 1-D (one entry per layer, one result per
    layer), and every index width is one column, so the whole estimate is a handful of ops.
    """
    n = nonzero.clamp(min=1.0)
    numel, widths, gap_runs = _constants(numel, n.dtype, n.device)
    density = (n / numel).clamp(max=1.0 - 1e-6)
    # r = (1 - density) ** 2^w through log1p / expm1: in float32, 1 - density drops the density's
    # last digits and the power multiplies that error by 2^w (0.2% of a layer's bytes at some densities)
    runs_log = torch.log1p(-density).unsqueeze(-1) * gap_runs
    r = runs_log.exp()
    n_col = n.unsqueeze(-1)
    fillers = n_col * r / (-torch.expm1(runs_log)).clamp_min(1e-12)
    indexed = (n_col + fillers) * (bits.unsqueeze(-1) + widths)
    dense = (numel * bits).unsqueeze(-1)
    bitmask = (n * bits + numel).unsqueeze(-1)
    costs = torch.cat([dense, bitmask, indexed], -1)
    sparse = costs[..., 1:].amin(-1)
    return (sparse + (costs.amin(-1) - sparse).detach()) / 8


def sparse_layer_bytes_with_slopes(nonzero: list[float], numel: list[int], bits: list[float]
                                   ) -> tuple[list[float], list[float], list[float]]:
    """`sparse_layer_bytes` per layer (the same formula, in double precision) and its two slopes,
    d/d nonzero and d/d bits, in closed form: what autograd gives through it (the cheapest *sparse*
    format's slopes; none below one kept weight, where the count is clamped).

    Why plain floats: a handful of layers' numbers; as tensor operations the size term recorded
    some forty autograd nodes on every step, and even without autograd their dispatch cost more
    than the arithmetic (size_budget.SizeTerm)."""
    values, d_count, d_bits = [], [], []
    for nz, total, b in zip(nonzero, numel, bits):
        n = max(nz, 1.0)
        ratio = n / total
        density = min(ratio, 1.0 - 1e-6)
        log_base = math.log1p(-density)
        best, d_n, d_b = n * b + total, b, n  # the bitmask
        for w in INDEX_WIDTHS:
            runs = 2.0 ** w
            r, one_minus_r = math.exp(runs * log_base), -math.expm1(runs * log_base)
            den = max(one_minus_r, 1e-12)
            fillers = n * r / den
            cost = (n + fillers) * (b + w)
            if cost < best:
                dr = -runs * r / (1.0 - density) / total if ratio <= 1.0 - 1e-6 else 0.0  # d r / d n
                d_fill = r / den + n * dr * (1.0 / den + (r / den ** 2 if one_minus_r > 1e-12 else 0.0))
                best, d_n, d_b = cost, (1.0 + d_fill) * (b + w), n + fillers
        values.append(min(total * b, best) / 8)
        d_count.append(d_n / 8 if nz >= 1.0 else 0.0)
        d_bits.append(d_b / 8)
    return values, d_count, d_bits


_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _constants(numel, dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(numel, the index widths, 2 ** widths) as tensors, made once per layer set instead of every
    step (the same values: the estimate is called on every training step). Only plain numbers
    (and lists of them) are cached; anything else is converted afresh."""
    plain = isinstance(numel, (int, float)) or (isinstance(numel, (list, tuple))
                                                 and all(isinstance(v, (int, float)) for v in numel))
    key = (tuple(numel) if isinstance(numel, (list, tuple)) else numel, dtype, device) if plain else None
    hit = _CONSTANTS.get(key) if plain else None
    if hit is None:
        widths = torch.tensor(INDEX_WIDTHS, dtype=dtype, device=device)
        hit = (torch.as_tensor(numel, dtype=dtype, device=device), widths, 2 ** widths)
        if plain:
            if len(_CONSTANTS) > 256:
                _CONSTANTS.clear()
            _CONSTANTS[key] = hit
    return hit


def finalized_copy(model: nn.Module, example_inputs=None):
    """A plain copy of the model as finalize would leave it now, and its spec. Blocks that
    prune_blocks is fading out are gone, as they will be in the file; channels that prune_structured
    masks, too (the copy is shrunk: `example_inputs` traces it); and the heads, FFN neurons and layers
    that prune_heads / prune_ffn / prune_layers mask, removed as session.finalize removes them."""
    from ..block_drop import as_dropped
    from ..finalize import carries_unit_masks, finalize
    from ..model_copy import plain_copy
    from .masks import harden_masks

    plain = as_dropped(plain_copy(model))
    harden_masks(plain)
    if carries_unit_masks(plain):
        from ..hf.finalize import finalize_copy_with_units

        return finalize_copy_with_units(plain)
    return plain, finalize(plain, example_inputs, warn_empty=False)


def _encoded(model: nn.Module, example_inputs=None):
    """The model as the artifact writer would encode it now (finalized_copy)."""
    from ..artifact.encode import encode_model

    return encode_model(*finalized_copy(model, example_inputs))


def fixed_bytes_detail(model: nn.Module, largest: int = 3, example_inputs=None) -> str:
    """Where the bytes go that no training decision moves (step sizes, biases, the tensors no
    technique compresses, the container), largest first, in words for an error message."""
    from ..artifact.store import file_blob

    enc = _encoded(model, example_inputs)
    t = enc.totals()
    others = sorted(enc.others.items(), key=lambda kv: -kv[1]["bytes"])
    named = ", ".join(f"{key} {rec['bytes']:,} B" for key, rec in others[:largest])
    more = f" and {len(others) - largest} more" if len(others) > largest else ""
    listed = f" ({named}{more})" if others else ""
    return (f"tensors stored as they are {t['other']:,} B{listed}, step sizes {t['scales']:,} B, "
            f"biases {t['biases']:,} B, container {len(file_blob(enc)) - t['total']:,} B")


def measured_bytes(model: nn.Module, example_inputs=None) -> dict[str, int]:
    """The weights file the artifact writer would produce for the model as it is now
    (`example_inputs`: where prune_structured masks channels, which finalize removes)."""
    from ..artifact.store import file_blob

    enc = _encoded(model, example_inputs)
    totals = enc.totals()
    total = len(file_blob(enc))
    return {"total": total, "variable": totals["values"] + totals["indices"]}


def embedding_hint(model: nn.Module, quantized=()) -> str:
    """A sentence for size errors: the bytes of embedding tables stored in fp32 (not among the
    `quantized` layer names, nor parametrized by a quantizer), if any, and the setting that
    quantizes them."""
    tables = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)
              and n not in quantized and not hasattr(m, "parametrizations")]
    if not tables:
        return ""
    holders: dict[int, list[str]] = {}
    for n, m in model.named_modules():
        if isinstance(getattr(m, "weight", None), torch.Tensor):
            holders.setdefault(id(m.weight), []).append(n)
    tied = {n: [o for o in holders.get(id(m.weight), []) if o != n] for n, m in tables}
    free = [(n, m) for n, m in tables if not tied[n]]
    bound = [(n, m) for n, m in tables if tied[n]]
    out = ""
    if free:  # the switch reaches these; a tied table beside them must be excluded, or the switch is refused
        skip = f", with {', '.join(n for n, _ in bound)} added to their exclude (tied, below)" if bound else ""
        out += (f"; {_tables(free)} hold {_fp32_bytes(free):,} B of it in fp32: quant_lsq.embeddings: true quantizes them "
                f"too (with prune_unstructured.embeddings: true where the recipe also prunes){skip}")
    if bound:  # each shares its weight with an output layer: the embeddings switch cannot reach it
        pairs = ", ".join(f"{n} with {tied[n][0]}" for n, _ in bound[:3])
        out += (f"; {_tables(bound)} hold {_fp32_bytes(bound):,} B of it in fp32, each tied to another layer ({pairs}), "
                "which keeps both as they are: untie them (e.g. config.tie_word_embeddings: false, then train the output "
                "layer) to compress the table")
    return out


def _tables(tables: list) -> str:
    return f"embedding tables ({', '.join(n for n, _ in tables[:3])}{' ...' if len(tables) > 3 else ''})"


def _fp32_bytes(tables: list) -> int:
    return sum(m.weight.numel() * 4 for _, m in tables)


def fixed_part_hint(model: nn.Module) -> str:
    """Sentences for a size message: the settings that shrink the bytes no decision of the run moves
    (normalization layers and embedding tables in fp32, modules no technique compresses until
    converted); "" where none applies."""
    from ..conversions import conversion_hint
    from .norm_storage import norm_format_hint

    return norm_format_hint(model) + embedding_hint(model) + conversion_hint(model)

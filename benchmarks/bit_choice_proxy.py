"""Choosing the weights' width before training: a one-shot projection of each teacher (what did not work).

Why: the joint form trains at `quant_lsq.bits`; a user asks which width to give it. The cheapest choice
would read the teacher before any training: for each width b, keep the weights that fit the target's bytes at
b bits (ranked by Fisher cost F*w^2, or by |w|, with each layer priced by the size budget's own estimate,
`size_estimate.sparse_layer_bytes_with_slopes`), round them per output channel to b bits (the step with the
least squared error), and read the loss on the training images. This script measures which width that
projection picks, for the teachers a compare run trained (OUT/teachers/s<seed>.safetensors; not committed, the
compare's stored command trains the same ones again), so its choice can be set beside the trained runs at each
width (BENCHMARKS.md, "Two bits, and choosing the width before training").

The projection's fixed bytes (biases, step sizes, the file's header) are approximated: 4 bytes per bias,
2 per output channel's step, 300 for the header; the choice does not hinge on them (see the margins stored).

    .venv/bin/python benchmarks/bit_choice_proxy.py --model lenet300 --teachers DIR/teachers --ratios 60,100 \
        --train-images 2000 --out benchmarks/results/bit_choice_proxy_lenet300_2k.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from compare_mnist import MNIST, balanced_subset  # noqa: E402

from jointcompress.data import load_mnist  # noqa: E402
from jointcompress.pipeline import builder_for, load_weights  # noqa: E402
from jointcompress.techniques.size_estimate import sparse_layer_bytes_with_slopes  # noqa: E402

WIDTHS = (2, 3, 4, 5, 6, 8)
STEP_FRACTIONS = torch.linspace(0.3, 1.0, 15)  # of max|w| / qmax: the rounding step candidates per channel


def weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 100) -> list[torch.Tensor]:
    """The empirical Fisher of each layer's weights: summed squared gradients of the loss, batch by batch."""
    layers = weighted_layers(model)
    totals = [torch.zeros_like(m.weight) for m in layers]
    for i in range(0, len(x), batch):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + batch]), y[i:i + batch], reduction="sum").backward()
        for total, m in zip(totals, layers):
            total += m.weight.grad ** 2
    return totals


def rounded(w: torch.Tensor, bits: int) -> torch.Tensor:
    """`w` (zeros pruned) rounded per output channel to symmetric `bits`-bit levels, each channel's step the
    candidate with the least squared error on its kept weights."""
    qmax = 2 ** (bits - 1) - 1
    flat, out = w.flatten(1), torch.zeros_like(w.flatten(1))
    for c in range(flat.shape[0]):
        kept = flat[c] != 0
        if not kept.any():
            continue
        steps = STEP_FRACTIONS * flat[c].abs().max() / qmax
        q = (flat[c] / steps[:, None]).round().clamp(-qmax, qmax) * steps[:, None] * kept
        out[c] = q[((q - flat[c]) ** 2).sum(1).argmin()]
    return out.view_as(w)


def kept_count(scores: list[torch.Tensor], sizes: list[int], bits: int, budget: float) -> float:
    """The threshold on `scores` under which the kept weights' bytes at `bits` fit `budget` (a bisection over
    the sorted scores: the most weights that fit)."""
    ranked = torch.cat([s.flatten() for s in scores]).sort(descending=True).values
    lo, hi = 1, len(ranked)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        counts = [float((s >= ranked[mid - 1]).sum()) for s in scores]
        if sum(sparse_layer_bytes_with_slopes(counts, sizes, [bits] * len(sizes))[0]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return float(ranked[lo - 1])


def projected(model, weights, scores, threshold, bits, x, y, teacher_logits) -> dict:
    """Loss, distillation loss and accuracy of `model` with its weights projected at `bits`; weights restored."""
    layers = weighted_layers(model)
    with torch.no_grad():
        for m, w, s in zip(layers, weights, scores):
            m.weight.copy_(rounded(w * (s >= threshold), bits))
        out = model(x)
        row = {"kept": int(sum(int((s >= threshold).sum()) for s in scores)),
               "loss": F.cross_entropy(out, y).item(), "accuracy": (out.argmax(1) == y).float().mean().item(),
               "distill": F.kl_div(F.log_softmax(out / 4, 1), F.softmax(teacher_logits / 4, 1),
                                   reduction="batchmean").item()}
        for m, w in zip(layers, weights):
            m.weight.copy_(w)
    return row


def seed_rows(teacher: nn.Module, x, y, ratios: list[float]) -> list[dict]:
    teacher.eval()
    layers = weighted_layers(teacher)
    weights = [m.weight.detach().clone() for m in layers]
    sizes = [w.numel() for w in weights]
    fish = fisher(teacher, x, y)
    with torch.no_grad():
        logits = teacher(x)
    fp32 = 4 * sum(p.numel() for p in teacher.parameters())
    fixed = sum(4 * m.bias.numel() + 2 * m.weight.shape[0] for m in layers if m.bias is not None) + 300
    rows = []
    for ratio in ratios:
        for rank in ("fisher", "magnitude"):
            scores = [f * w ** 2 if rank == "fisher" else w.abs() for f, w in zip(fish, weights)]
            per_bits = {b: projected(teacher, weights, scores, kept_count(scores, sizes, b, fp32 / ratio - fixed),
                                     b, x, y, logits) for b in WIDTHS}
            rows.append({"ratio": ratio, "rank": rank, "by_bits": per_bits,
                         "chosen_by_loss": min(per_bits, key=lambda b: per_bits[b]["loss"]),
                         "chosen_by_distill": min(per_bits, key=lambda b: per_bits[b]["distill"])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--teachers", type=Path, required=True, help="a compare run's OUT/teachers folder")
    ap.add_argument("--ratios", required=True)
    ap.add_argument("--train-images", type=int, help="the compare's class-balanced subset")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = load_mnist(MNIST)
    if args.train_images:
        split = balanced_subset(split, args.train_images)
    x, y = split.x_train[:2000], split.y_train[:2000]
    builder = builder_for(args.model, split, check=False)
    seeds = {}
    for path in sorted(args.teachers.glob("s*.safetensors")):
        seeds[path.stem] = seed_rows(load_weights(builder(), path), x, y, [float(r) for r in args.ratios.split(",")])
        for row in seeds[path.stem]:
            print(path.stem, row["ratio"], row["rank"], "loss picks", row["chosen_by_loss"],
                  "distill picks", row["chosen_by_distill"], flush=True)
    result = {"command": " ".join([".venv/bin/python benchmarks/bit_choice_proxy.py"] + sys.argv[1:]),
              "model": args.model, "widths": list(WIDTHS), "images_read": len(x), "seeds": seeds}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

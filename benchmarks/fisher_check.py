"""Does the diagonal Fisher price a layer's weights the way the loss does? Layer by layer, on a trained
dense model: the Optimal Brain Damage estimate of what removing a share of the layer's weights costs
(1/2 * F * w^2 summed, F = batch size * the mean squared minibatch gradient, the estimate the size
budget's saliency uses) against the loss change measured when they are removed.

    .venv/bin/python benchmarks/fisher_check.py --model vit --train-images 2000 --teacher-epochs 40 \
        --share 0.2 --out benchmarks/results/fisher_check_vit_2k.json

Why: across layers the saliency compares these estimates in one currency. Where the ratio measured /
estimated differs much from layer to layer, the Fisher price moves bytes toward the layers it
overprices (docs/joint.md, "Cutting the lag as it builds up").
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_mnist import MNIST, balanced_subset  # noqa: E402

from jointcompress.data import load_mnist  # noqa: E402
from jointcompress.pipeline import train_teacher  # noqa: E402

BATCH = 128


def budgeted_layers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a size budget would price: every Linear and convolution weight (the models here
    hold attention as Linear projections, attention.mha_to_linear)."""
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}


def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(sum(F.cross_entropy(model(x[i:i + 1000]), y[i:i + 1000], reduction="sum")
                         for i in range(0, len(y), 1000)) / len(y))


def fisher(model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict:
    """B * the mean over minibatches of the squared minibatch gradient, per weight."""
    sums = {k: torch.zeros_like(w) for k, w in weights.items()}
    batches = 0
    for i in range(0, len(y) - BATCH + 1, BATCH):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + BATCH]), y[i:i + BATCH]).backward()
        for k, w in weights.items():
            sums[k] += w.grad.detach() ** 2
        batches += 1
    return {k: s * (BATCH / batches) for k, s in sums.items()}


def check_layer(model, w: torch.Tensor, f: torch.Tensor, share: float, split, base: dict) -> dict:
    """Remove the layer's `share` of weights of least OBD cost; the estimate and the measured loss changes."""
    cost = 0.5 * f * w.detach() ** 2
    k = max(1, int(share * w.numel()))
    idx = torch.argsort(cost.flatten())[:k]
    saved = w.detach().clone()
    with torch.no_grad():
        w.view(-1)[idx] = 0.0
    row = {"weights": w.numel(), "removed": k, "estimated": float(cost.flatten()[idx].sum()),
           "train_delta": mean_loss(model, split.x_train, split.y_train) - base["train"],
           "test_delta": mean_loss(model, split.x_test, split.y_test) - base["test"]}
    with torch.no_grad():
        w.copy_(saved)
    row["train_over_estimate"] = row["train_delta"] / row["estimated"] if row["estimated"] > 0 else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit")
    ap.add_argument("--data", default=MNIST, help="relative to the repository root")
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--teacher-epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--share", type=float, default=0.2, help="share of each layer's weights removed")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = balanced_subset(load_mnist(args.data), args.train_images) if args.train_images else load_mnist(args.data)
    model = train_teacher(args.model, split, args.teacher_epochs, seed=args.seed).eval()
    weights = budgeted_layers(model)
    f = fisher(model, weights, split.x_train, split.y_train)
    model.zero_grad(set_to_none=True)
    base = {"train": mean_loss(model, split.x_train, split.y_train), "test": mean_loss(model, split.x_test, split.y_test)}
    layers = {k: check_layer(model, w, f[k], args.share, split, base) for k, w in weights.items()}
    result = {"command": " ".join([".venv/bin/python benchmarks/fisher_check.py"] + sys.argv[1:]),
              "base_loss": base, "share": args.share, "layers": layers}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for k, r in layers.items():
        ratio = r["train_over_estimate"]
        print(f"{k:40s} est {r['estimated']:.2e}  train +{r['train_delta']:.2e}  test +{r['test_delta']:.2e}  "
              f"measured/est {ratio:.2g}" if ratio is not None else f"{k}: estimate 0")


if __name__ == "__main__":
    main()

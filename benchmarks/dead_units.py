"""How many bytes dead hidden units cost in LeNet-300-100 artifacts (a measurement, not a feature).

A hidden unit whose incoming weights are all zero outputs the constant relu(b): its bias, its
per-channel step size and its column of the next layer's weights are stored only to add a
constant to the next layer. Folding it (next.bias += next.weight[:, j] * relu(b_j)) and removing
the unit with Torch-Pruning gives the same logits in a smaller file. This script does that on
the saved artifacts of compare runs and re-encodes them with the artifact writer:

    .venv/bin/python benchmarks/dead_units.py DIR [DIR ...] --out benchmarks/results/NAME.json

DIR: a compare folder with runs/*/artifact. The logit gap is measured on 1,000 MNIST test
images with the folded biases rounded to fp16, as the file stores them.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from jointcompress.artifact.encode import encode_model
from jointcompress.artifact.store import file_blob, load_with_spec
from jointcompress.data import load_mnist
from jointcompress.graph import build_graph
from jointcompress.models import build_model

PAIRS = (("fc1", "fc2"), ("fc2", "fc3"))  # LeNet-300-100: Linear -> ReLU -> Linear


@torch.no_grad()
def fold(model, spec, example) -> dict[str, int]:
    """Fold every dead unit into the next layer's bias and remove it (in place); dead units per layer."""
    dg = build_graph(model, example)
    dead_counts = {}
    for a, b in PAIRS:
        la, lb = getattr(model, a), getattr(model, b)
        dead = torch.nonzero(la.weight.abs().sum(1) == 0).flatten().tolist()
        dead_counts[a] = len(dead)
        if not dead:
            continue
        lb.bias += lb.weight[:, dead] @ torch.relu(la.bias[dead])
        lb.bias.copy_(lb.bias.half().float())  # the file stores biases in fp16
        gone = set(dead)
        spec.layers[a].scale = spec.layers[a].scale[[i for i in range(la.out_features) if i not in gone]]
        dg.get_pruning_group(la, dg.get_pruner_of_module(la).prune_out_channels, dead).prune()
    spec.pruning_history = [list(h) for h in dg.pruning_history()]
    return dead_counts


def measure(artifact: Path, images: torch.Tensor) -> dict:
    model, spec = load_with_spec(artifact, lambda: build_model("lenet300", 28, 10))
    before = len(file_blob(encode_model(model, spec)))
    ref = model(images)
    folded, fspec = copy.deepcopy(model), copy.deepcopy(spec)
    dead = fold(folded, fspec, images[:2])
    after = len(file_blob(encode_model(folded, fspec)))
    gap = float((folded(images) - ref).abs().max())
    same = bool((folded(images).argmax(1) == ref.argmax(1)).all())
    return {"artifact": str(artifact), "file_bytes": before, "folded_bytes": after, "saved_bytes": before - after,
            "saved_share": round(1 - after / before, 4), "dead_units": dead, "max_logit_gap": gap,
            "same_predictions": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", type=Path, nargs="+")
    ap.add_argument("--data", default="../shared/datasets/mnist/mnist.npz")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = load_mnist(args.data).x_test[:1000]
    rows = []
    for d in args.dirs:
        for art in sorted(d.glob("runs/*/artifact")):
            rows.append({"run": art.parent.name, **measure(art, images)})
            print(rows[-1]["run"], rows[-1]["file_bytes"], "->", rows[-1]["folded_bytes"], rows[-1]["dead_units"], flush=True)
    cmd = " ".join([".venv/bin/python benchmarks/dead_units.py"] + sys.argv[1:])
    args.out.write_text(json.dumps({"command": cmd, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

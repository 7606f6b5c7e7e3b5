"""int8 ONNX Runtime of a model trained to round its layers' inputs (quant_lsq activations: true): how close
the int8 model's logits and classes are to the finalized fp32 model's, which computes what training did.

    .venv/bin/python benchmarks/int8_input_steps.py [--train-images 12000] [--label now]

LeNet-5 trained on the first --train-images MNIST training images (2 epochs), then compressed with 4-bit
weights (half of them pruned) and inputs rounded at 4 and at 8 bits (2 epochs, distilled), finalized,
and built into int8 by quantize_int8 on 512 training images. On the 10,000 test images: each model's
accuracy, the int8 model's top-1 agreement with the fp32 model, and the mean and max |logit difference|.
Run at a commit before the trained input steps reached the int8 graph (125703e) with --label before, for the
same numbers the earlier export gave: `git worktree add /tmp/before 125703e` and
`PYTHONPATH=/tmp/before/src .venv/bin/python benchmarks/int8_input_steps.py --label before`.
Writes benchmarks/results/int8_input_steps_<label>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import warnings
from pathlib import Path

import torch

from jointcompress import compress
from jointcompress.data import evaluator, load_mnist
from jointcompress.deploy.int8 import quantize_int8
from jointcompress.pipeline import train_teacher

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist" / "mnist.npz"
RESULTS = Path(__file__).parent / "results"


def recipe(act_bits: int) -> dict:
    return {"training": {"epochs": 2, "seed": 0}, "techniques": [
        {"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5},
        {"type": "quant_lsq", "bits": 4, "activations": True, "act_bits": act_bits, "start": 0.3},
        {"type": "distill_kd", "temperature": 4, "alpha": 0.7}]}


def fidelity(model, int8, x, y) -> dict:
    with torch.no_grad():
        ref = torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])
    ours = torch.cat([int8(x[i:i + 500]) for i in range(0, len(x), 500)])
    diff = (ours - ref).abs()
    return {"fp32_accuracy": (ref.argmax(1) == y).float().mean().item(),
            "int8_accuracy": (ours.argmax(1) == y).float().mean().item(),
            "top1_agreement": (ours.argmax(1) == ref.argmax(1)).float().mean().item(),
            "mean_abs_logit_diff": diff.mean().item(), "max_abs_logit_diff": diff.max().item(),
            "mean_abs_logit": ref.abs().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-images", type=int, default=12000)
    ap.add_argument("--label", default="now")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    split = load_mnist(MNIST)
    split.x_train, split.y_train = split.x_train[:args.train_images], split.y_train[:args.train_images]
    teacher = train_teacher("lenet5", split, epochs=2).eval()
    rows = {}
    for act_bits in (4, 8):
        student = copy.deepcopy(teacher)
        result = compress(student, recipe(act_bits), (split.x_train, split.y_train),
                          evaluator(split.x_test, split.y_test), teacher=teacher)
        spec = result.finalize()
        student.eval()
        with tempfile.TemporaryDirectory() as tmp:
            int8 = quantize_int8(student, spec, split.x_train[:512], split.x_test[:64], workdir=tmp)
            rows[f"act_bits_{act_bits}"] = fidelity(student, int8, split.x_test, split.y_test)
        print(act_bits, json.dumps(rows[f"act_bits_{act_bits}"]))
    cmd = f"python benchmarks/int8_input_steps.py --train-images {args.train_images} --label {args.label}"
    out = RESULTS / f"int8_input_steps_{args.label}.json"
    out.write_text(json.dumps({"command": cmd, "test_images": len(split.x_test), **rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

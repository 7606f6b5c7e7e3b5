"""What the step sizes of dead output channels cost, and what storing only the live ones saves.

    .venv/bin/python benchmarks/dead_channel_steps.py

An output channel that keeps no weight (and has no bias) computes zero whatever its step; the
writer stores only the live channels' steps (`live_only`, docs/artifact_format.md). For each point
a teacher is trained, compressed in the joint form under a size target (4-bit LSQ, zero as a
level, KD), finalized and saved; the same finalized model is then encoded as the writer did
before (every channel's step), so both numbers describe one model. The run itself trained under
the new writer: its landing spent the freed bytes on weights.

Points: LeNet-5 on MNIST (the first --train-images training images, the 10,000 test images) at
100x, 200x and 400x; a small depthwise-separable CNN with GroupNorm (defined here, the kind of
model a user brings) on synthetic 3x32x32 colour images at 10x, 20x and 30x. Writes
benchmarks/results/dead_channel_steps.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from jointcompress import compress, train_baseline  # noqa: E402
from jointcompress.artifact import encode, save  # noqa: E402
from jointcompress.artifact.store import file_blob  # noqa: E402
from jointcompress.data import Split, evaluator, load_mnist  # noqa: E402
from jointcompress.models import build_model  # noqa: E402

MNIST = ROOT.parent / "shared" / "datasets" / "mnist" / "mnist.npz"


class DSBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.gn1, self.pw, self.gn2 = nn.GroupNorm(4, cin), nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(4, cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.gn2(self.pw(self.act(self.gn1(self.dw(x))))))


def depthwise_cnn(num_classes: int = 5) -> nn.Module:
    """A user's kind of model: a stem, three depthwise-separable blocks with GroupNorm, a linear head."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.Hardswish(),
                         DSBlock(32, 64, 2), DSBlock(64, 128, 2), DSBlock(128, 128, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


def colour_blobs(n: int = 3000, seed: int = 0) -> Split:
    """Five classes of noisy 3x32x32 images, each with a brighter patch of its own colour and place."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    x = rng.normal(0, 0.5, (n, 3, 32, 32)).astype(np.float32)
    for c in range(5):
        x[y == c, c % 3, 8 + 3 * c: 14 + 3 * c, 8:20] += 1.5
    x = (x - x.mean()) / x.std()
    cut = n * 5 // 6
    t = torch.from_numpy
    return Split(t(x[:cut]), t(y[:cut]).long(), t(x[cut:]), t(y[cut:]).long(), "colour-blobs")


def step_bytes(manifest_or_encoding) -> int:
    layers = manifest_or_encoding["layers"] if isinstance(manifest_or_encoding, dict) else manifest_or_encoding.layers
    return sum(rec["parts"]["scale"]["bytes"] for rec in layers.values())


def every_step_encoding(model, spec):
    """The model encoded as the writer did before `live_only`: every channel's step."""
    live_only = encode.stored_steps
    encode.stored_steps = lambda scale, live: (scale, False)
    try:
        return encode.encode_model(model, spec)
    finally:
        encode.stored_steps = live_only


def point(name: str, teacher: nn.Module, split: Split, ratio: float, epochs: int, seed: int) -> dict:
    model = copy.deepcopy(teacher)
    # recalibrate_norms 0: BatchNorm's running averages, as its stored results were measured
    recipe = {"mode": "joint", "target": {"ratio": ratio}, "training": {"epochs": epochs, "batch_size": 128, "seed": seed,
                                                                        "recalibrate_norms": 0},
              "techniques": [{"type": "quant_lsq", "bits": 4}, {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7}]}
    t0 = time.perf_counter()
    result = compress(model, recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test), teacher=teacher)
    spec = result.finalize()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = save(model, spec, tmp, example_inputs=result.example_inputs)
    before = every_step_encoding(model, spec)
    live = dead = 0
    for rec_name in spec.layers:
        w = model.get_submodule(rec_name).weight.detach()
        alive = int((w.flatten(1) != 0).any(1).sum())
        live, dead = live + alive, dead + w.shape[0] - alive
    return {"model": name, "ratio": ratio, "accuracy": result.metrics["accuracy"], "file_bytes": manifest["weights_file_bytes"], "file_bytes_every_step": len(file_blob(before)),
            "step_bytes": step_bytes(manifest), "step_bytes_every_step": step_bytes(before),
            "channels_without_a_weight": dead, "channels": live + dead, "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="100,200,400")
    ap.add_argument("--cnn-ratios", default="10,20,30", help="the depthwise CNN's targets")
    ap.add_argument("--train-images", type=int, default=10000)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dead_channel_steps.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    mnist = load_mnist(MNIST)
    mnist = Split(mnist.x_train[: args.train_images], mnist.y_train[: args.train_images], mnist.x_test, mnist.y_test,
                  mnist.name)
    for kind, split, build, ratios in (
            ("lenet5", mnist, lambda s: build_model("lenet5", image_size=s.image_size, num_classes=s.num_classes),
             args.ratios),
            ("depthwise-cnn", colour_blobs(seed=args.seed), lambda s: depthwise_cnn(s.num_classes), args.cnn_ratios)):
        torch.manual_seed(args.seed)
        teacher = build(split)
        train_baseline(teacher, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test),
                       epochs=args.teacher_epochs, seed=args.seed)
        for ratio in (float(r) for r in ratios.split(",")):
            rows.append(point(kind, teacher, split, ratio, args.epochs, args.seed))
            print(json.dumps(rows[-1]), flush=True)
    recorded = {**vars(args), "out": os.path.relpath(args.out, ROOT)}  # no machine's absolute path in a result
    command = ".venv/bin/python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    Path(args.out).write_text(json.dumps({"command": command, "args": recorded, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

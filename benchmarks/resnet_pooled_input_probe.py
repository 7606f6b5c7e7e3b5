"""A probe, not a feature: the small ResNet reading its image average-pooled 2x2, then half its channels removed.

    python benchmarks/resnet_pooled_input_probe.py --data ../shared/datasets/mnist/mnist.npz --teacher-epochs 2 \
        --epochs 6 --sparsity 0.5 --out benchmarks/results/resnet_pooled_input_probe_e6.json

Why: channel pruning alone cannot make models.SmallResNet 20x faster than dense fp32 PyTorch within 0.5
points (docs/latency.md, "What bounds the speed-up"): its stem does not downsample, so layer1's two
convolutions run on 28x28 maps, about 70% of the work at every width. This asks what reading the image at
14x14 would give. The student is SmallResNet's layers under the same names with `avg_pool2d(x, 2)` in
front (every later map is a quarter the size); it starts from the dense teacher's weights, then the
package's own recipe removes channels (prune_structured, uniform `--sparsity`; `--drop-blocks layer1`: that
block too, prune_blocks), with int8-aware LSQ (8 bits)
and KD from the 28x28 teacher, its kept epoch chosen on 5,000 held-out training images. Reported: test
accuracy of both, the student's widths after finalize, and the deployed student (deploy.ort_deploy, ONNX
Runtime fp32, 1 thread, spinning off) timed against dense fp32 PyTorch with deploy.timing (interleaved
medians, each also alone) at batch 64 and 1. The teacher trains here (pipeline.train_teacher) unless
`--teacher` names a state dict saved by an earlier run of this script.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from jointcompress import compress
from jointcompress.data import evaluator, hold_out, load_mnist
from jointcompress.deploy.ort_deploy import deploy_fp32
from jointcompress.deploy.timing import describe, time_contenders
from jointcompress.io import atomic_write_text
from jointcompress.models import BasicBlock, SmallResNet
from jointcompress.pipeline import train_teacher


class PooledResNet(nn.Module):
    """models.SmallResNet's layers, under its names (its state dict loads as it is), reading the image
    average-pooled `pool` x `pool`."""

    def __init__(self, width: int = 16, pool: int = 2):
        super().__init__()
        self.pool = pool
        self.stem = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(F.avg_pool2d(x, self.pool))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def widths(model: PooledResNet) -> list[int]:
    """stem / layer1.conv1 / layer2.conv1 / layer2 out / layer3.conv1 / layer3 out, as docs/latency.md lists them
    (0: the block was dropped)."""
    layer1 = getattr(getattr(model.layer1, "conv1", None), "out_channels", 0)
    return [model.stem.out_channels, layer1, model.layer2.conv1.out_channels,
            model.layer2.conv2.out_channels, model.layer3.conv1.out_channels, model.layer3.conv2.out_channels]


def teacher_for(args, split) -> nn.Module:
    if args.teacher and Path(args.teacher).is_file():
        teacher = SmallResNet()
        teacher.load_state_dict(torch.load(args.teacher, weights_only=True))
        return teacher.eval()
    teacher = train_teacher("resnet", split, epochs=args.teacher_epochs).eval()
    if args.teacher:
        torch.save(teacher.state_dict(), args.teacher)
    return teacher


def timed(student: nn.Module, teacher: nn.Module, split, workdir: Path) -> dict:
    out, run = {}, deploy_fp32(copy.deepcopy(student), workdir / "student.onnx", split.x_test[:1]).predict()
    for batch in (64, 1):  # one export serves both batches, as in bench --against (deploy.ort_deploy)
        x = split.x_test[:batch].contiguous()
        t = time_contenders({"dense_fp32_torch": lambda: teacher(x), "student_ort_fp32": lambda: run(x)}, threads=1,
                            rounds=60 if batch == 64 else 600)
        out[f"batch{batch}"] = {
            "interleaved_ms": t.interleaved_ms, "alone_ms": t.alone_ms, "flagged": t.flagged, "timing": describe(t),
            "speedup_interleaved": t.interleaved_ms["dense_fp32_torch"] / t.interleaved_ms["student_ort_fp32"],
            "speedup_alone": t.alone_ms["dense_fp32_torch"] / t.alone_ms["student_ort_fp32"]}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/datasets/mnist/mnist.npz")
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--teacher", default="", help="a state dict to load, or to save the teacher to once trained")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--drop-blocks", default="", help="residual blocks removed whole as well (prune_blocks), e.g. layer1")
    ap.add_argument("--seed", type=int, default=0, help="the student's run (training.seed); the teacher is the same")
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/jc-resnet-pooled")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    load_before, started = os.getloadavg(), time.time()
    torch.set_num_threads(args.train_threads)
    split = hold_out(load_mnist(args.data), 5000)
    teacher = teacher_for(args, split)
    test, val = evaluator(split.x_test, split.y_test), evaluator(split.x_val, split.y_val)
    student = PooledResNet()
    student.load_state_dict(teacher.state_dict())
    result = {"command": "python benchmarks/resnet_pooled_input_probe.py " + " ".join(sys.argv[1:]),
              "teacher_test": test(teacher)["accuracy"], "student_before_training_test": test(student.eval())["accuracy"]}
    blocks = [{"type": "prune_blocks", "blocks": args.drop_blocks.split(",")}] if args.drop_blocks else []
    recipe = {"techniques": [*blocks, {"type": "prune_structured", "sparsity": args.sparsity, "end": 0.5},
                             {"type": "quant_lsq", "bits": 8, "start": 0.3},
                             {"type": "distill_kd", "temperature": 4, "alpha": 0.7, "cache_teacher": True}],
              # BatchNorm's running averages, as its stored results were measured (before training.recalibrate_norms)
              "training": {"epochs": args.epochs, "lr": 1e-3, "batch_size": 128, "seed": args.seed, "recalibrate_norms": 0}}
    compress(student.train(), recipe, (split.x_train, split.y_train), val, teacher=teacher).finalize()
    student.eval()
    result.update(recipe=recipe, student_test=test(student)["accuracy"], student_val=val(student)["accuracy"],
                  widths=widths(student))
    result["points_lost"] = 100 * (result["teacher_test"] - result["student_test"])
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result.update(timed(student, teacher, split, workdir), wall_seconds=time.time() - started,
                  load_average_before_after=[load_before, os.getloadavg()])
    atomic_write_text(Path(args.out), json.dumps(result, indent=1, default=float) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("recipe",)}, indent=1, default=float))


if __name__ == "__main__":
    main()

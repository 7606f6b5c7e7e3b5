"""What `jointcompress demo` runs: one size target reached sequentially and jointly, plus a fast
model with channels physically removed and int8 weights, all measured on held-out data.

The size rows answer "how small at what accuracy" (unstructured sparsity + low-bit weights:
the smallest file, but a dense-speed model). The structured row answers "how fast": whole
channels are removed, so the model itself shrinks, and the int8 ONNX Runtime model runs on
the trained LSQ scales. Every latency comes from deploy.timing (same threads for all, ORT
spinning off, interleaved rounds, medians, each also timed alone).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .compare import variant_recipe
from .data import Split, hold_out, load_digits
from .deploy.int8 import int8_parity, quantize_int8
from .pipeline import builder_for, compress_and_save, measure_latency, train_teacher, uncompressed_row
from .recipe import Recipe, builtin_recipe, load_recipe, parse_recipe
from .targets import NOTHING_TRAINED, refusal_before_training, resolve_target, target_bytes

DEFAULT_MODEL = "lenet5"
DEFAULT_RATIO = 100.0
STRUCTURED_CHANNELS = 0.75  # share of conv channels / hidden units the fast model removes
LATENCY_BATCH = 64
# digits training images held out (a fixed draw) to choose the teacher's and each run's kept epoch on, so the
# 449 test images the table reports played no part in any choice (training.validation_images)
VALIDATION_IMAGES = 150
# the joint row: what `mode: joint` trains under a size target (joint_form.py), with PCGrad between accuracy
# and size; on the demo's point it is 0.82 ± 0.20 points ahead of joint-pcgrad (size_budget's defaults), paired
# over 3 seeds in BENCHMARKS.md (benchmarks/results/demo_seeds*.json)
JOINT_VARIANT = "joint-paced-obdland-pcgrad"


@dataclass
class DemoResult:
    rows: dict[str, dict]
    target_bytes: float
    wall_seconds: float
    recipe: dict
    model: str
    held_out: int  # the test images the table reports
    selected_on: str = "test"  # what chose every kept epoch (data.Split.selected_on)


def demo_recipe(model: str, epochs: int | None, ratio: float, validation_images: int = VALIDATION_IMAGES,
                scale_format: str = "auto") -> Recipe:
    """The built-in demo recipe on `model`, with its size target and its held-out training images
    (`scale_format`: quant_lsq's, for benchmarks that pin the step sizes' format)."""
    data = load_recipe(builtin_recipe("demo")).model_dump()
    data["model"] = model
    for technique in data["techniques"]:
        if technique["type"] == "quant_lsq":
            technique["scale_format"] = scale_format
    data["training"]["validation_images"] = validation_images
    if epochs:
        data["training"]["epochs"] = epochs
    data["target"] = {"ratio": ratio}
    return parse_recipe(data, source="demo")


def structured_recipe(targeted: Recipe, channels: float = STRUCTURED_CHANNELS) -> Recipe:
    """The fast model's recipe: the demo's training and distillation, with `channels` of every
    prunable channel group removed (learned scores) and 8-bit LSQ weights for int8 inference."""
    data = targeted.model_dump()
    data["target"], data["mode"] = None, "joint"
    keep = [t for t in data["techniques"] if t["type"] == "distill_kd"]
    data["techniques"] = [
        {"type": "prune_structured", "sparsity": channels, "criterion": "learned", "end": 0.6},
        {"type": "quant_lsq", "bits": 8, "start": 0.3},
        *keep,
    ]
    data["coordination"]["strategy"] = "none"
    return parse_recipe(data, source="demo (structured)")


def run_demo(out: Path, model: str = DEFAULT_MODEL, ratio: float = DEFAULT_RATIO, teacher_epochs: int = 15,
             epochs: int | None = None, seed: int | None = None, structured: bool = True,
             progress: Callable[[str], Callable | None] = lambda name: None,
             joint_variant: str = JOINT_VARIANT, device: torch.device | None = None,
             validation_images: int = VALIDATION_IMAGES, scale_format: str = "auto") -> DemoResult:
    """Teacher on digits; sequential and joint (compare's `joint_variant`) at `ratio` (compression seed
    `seed`, default the recipe's); the structured int8 model unless `structured` is False; latency.
    Every model trains on `device` (default: the CPU); latency is measured on the CPU. Every kept epoch
    is chosen on `validation_images` training images held out (0: on the test split)."""
    t0 = time.perf_counter()
    targeted = demo_recipe(model, epochs, ratio, validation_images, scale_format)
    split = hold_out(load_digits(), targeted.training.validation_images)
    if seed is not None:
        targeted.training.seed = seed
    builder = builder_for(model, split)
    refusal = refusal_before_training(builder(), targeted, split.x_train[:2])  # not after the teacher has trained
    if refusal is not None:
        refusal.add_note(NOTHING_TRAINED)
        raise refusal
    teacher = train_teacher(model, split, teacher_epochs, lr=targeted.training.lr, progress=progress("teacher"),
                            device=device)
    rows, fast = {"uncompressed": uncompressed_row(teacher, split)}, {"uncompressed": teacher}
    budgets = resolve_target(teacher, targeted, split.x_train[:2])
    for mode, variant in (("sequential", "sequential"), ("joint", joint_variant)):
        r = variant_recipe(budgets, variant, targeted.training.seed, targeted, teacher, split.x_train[:2])
        outcome = compress_and_save(mode, teacher, r, split, builder, out, progress=progress(mode), device=device)
        rows[mode], fast[mode] = outcome.row, outcome.model
    if structured:
        rows["structured int8"], fast["structured int8"] = structured_row(teacher, targeted, split, builder, out, progress,
                                                                          device)
    x = split.x_test[:LATENCY_BATCH]
    for name, lat in measure_latency(fast, x).items():
        rows[name].update(lat)
    return DemoResult(rows, target_bytes(teacher, targeted.target), time.perf_counter() - t0,
                      targeted.model_dump(), model, len(split.x_test), split.selected_on)


def structured_row(teacher: nn.Module, targeted: Recipe, split: Split, builder, out: Path,
                   progress: Callable[[str], Callable | None], device: torch.device | None = None) -> tuple[dict, Callable]:
    """Train, finalize (channels removed) and save the fast model, then build its int8 ONNX
    Runtime model on the trained scales; the row's accuracy is the int8 model's, on held-out data."""
    recipe = structured_recipe(targeted)
    outcome = compress_and_save("structured", teacher, recipe, split, builder, out, progress=progress("structured"),
                                device=device)
    int8 = quantize_int8(outcome.model, outcome.spec, (split.x_train[:512], split.y_train[:512]),
                         split.x_test[:LATENCY_BATCH], workdir=out / "structured-int8")  # the deployable int8 ONNX model, beside the artifact
    parity = int8_parity(outcome.model, int8, (split.x_test, split.y_test))
    row = dict(outcome.row)
    row.update(accuracy=parity.metric_deployed, bits="int8", fp32_accuracy=outcome.row["accuracy"],
               params=sum(p.numel() for p in outcome.model.parameters()),
               nonzero=sum(int((p != 0).sum()) for p in outcome.model.parameters()),
               channels=channel_counts(outcome.model), dense_channels=channel_counts(teacher))
    return row, int8


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels / features of every conv and linear layer (what structured pruning removes)."""
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

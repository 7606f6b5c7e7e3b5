"""jointcompress vs Torch-Pruning + PyTorch int8, side by side, at equal threads and fair settings.

    .venv/bin/python benchmarks/against_torch_pruning.py --data ../shared/datasets/mnist/mnist.npz --model lenet5
    .venv/bin/python benchmarks/against_torch_pruning.py --data ../shared/datasets/mnist/mnist.npz --model resnet --train-limit 20000

1. A dense teacher is trained (--teacher-epochs); its fp32 PyTorch latency at batch 64 over
   --speedup is the latency target.
2. jointcompress: per-group widths from a measured per-layer latency table (PyTorch fp32),
   scaled to the deployment runtime by timing the shrunk model there (latency_targets,
   calibrate=True); then structured pruning to those widths + 8-bit LSQ + KD from the teacher
   in one joint run of --epochs epochs, finalize (channels removed), deployed in ONNX Runtime
   fp32 (the LSQ weights exactly) and int8 (QDQ with the trained scales).
3. Torch-Pruning: MagnitudePruner (L2 magnitude, its default uniform per-layer ratio) pruned
   step by step, with fine-tuning (cross-entropy, Adam, same lr and batch) between steps, over
   the same number of training steps as ours; the most pruned step whose accuracy (on the
   first --select-images test images, as ours is chosen) still matches ours is kept ("pruned until its accuracy matches ours"); then PyTorch FX int8
   (x86 engine) and, for a same-runtime comparison, ONNX Runtime fp32.
4. Every contender is timed at batch 1 and 64 with --threads threads (deploy.timing: ORT
   intra-op threads, one inter-op thread, spinning off; interleaved rounds, medians, each also
   timed alone). Accuracy on the 10,000 MNIST test images.

Writes benchmarks/results/against_torch_pruning_<model>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from jointcompress import compress, finalize
from jointcompress.bench import batch_of, count_macs
from jointcompress.data import evaluator, load_mnist
from jointcompress.deploy.int8 import quantize_int8
from jointcompress.deploy.onnx_export import export_onnx, ort_predict, ort_session
from jointcompress.deploy.timing import time_contenders
from jointcompress.graph import discover_groups
from jointcompress.latency_targets import allocate_latency, measure_table
from jointcompress.pipeline import train_teacher
from jointcompress.recipe import Target


def selection_split(split, n: int):
    """The split with only the first n test images: what training-time choices (best epoch,
    Torch-Pruning's step) look at; final accuracies use all 10,000."""
    import dataclasses

    return dataclasses.replace(split, x_test=split.x_test[:n], y_test=split.y_test[:n])


def accuracy_of(fn, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        hits = sum(int((fn(x[i:i + 1000]).argmax(-1) == y[i:i + 1000]).sum()) for i in range(0, len(x), 1000))
    return hits / len(x)


def alone_ms(fn, x: torch.Tensor, threads: int) -> float:
    return time_contenders({"m": lambda: fn(x)}, threads=threads, rounds=20, warmup=3, alone_runs=5).interleaved_ms["m"]


def ort_fp32(model: nn.Module, path: Path, example: torch.Tensor, threads: int):
    return ort_predict(ort_session(export_onnx(model, path, example), threads))


def our_recipe(alloc, epochs: int, batch_size: int) -> dict:
    return {
        "mode": "joint",
        "training": {"epochs": epochs, "lr": 1e-3, "batch_size": batch_size},
        "coordination": {"strategy": "none", "every": 50},
        "techniques": [
            {"type": "prune_structured", "sparsity": min(0.99, alloc.overall_sparsity), "criterion": "magnitude",
             "scope": "layer", "end": 0.5,
             "layer_sparsity": {g: min(0.99, s) for g, s in alloc.layer_sparsity.items()}},  # 0.0 = keep all
            {"type": "quant_lsq", "bits": 8, "start": 0.3},
            {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7, "cache_teacher": True},
        ],
    }


def widths_of(model: nn.Module, example) -> dict[str, int]:
    return {g.name: g.channels for g in discover_groups(model, example)[0]}


def ours(args, teacher, split, example, work: Path, target_ms: float) -> dict:
    """Allocate widths for the target on the deployment runtime, train jointly, deploy."""
    x64 = batch_of(split.x_test, 64)
    table = measure_table(teacher, example, 64, args.threads)
    deploy = lambda m: alone_ms(ort_fp32(m, work / "probe.onnx", example, args.threads), x64, args.threads)  # noqa: E731
    alloc = allocate_latency(teacher, example, Target(latency_ms=target_ms, batch=64), table=table, measure=deploy,
                             calibrate=True, max_rounds=5)
    model = copy.deepcopy(teacher)
    t0 = time.perf_counter()
    sel = selection_split(split, args.select_images)
    res = compress(model, our_recipe(alloc, args.epochs, args.batch_size), (split.x_train, split.y_train),
                   evaluator(sel.x_test, sel.y_test), teacher=teacher)
    spec = finalize(model, res.example_inputs)
    train_s = time.perf_counter() - t0
    fp32 = ort_fp32(model, work / "ours_fp32.onnx", example, args.threads)
    int8 = quantize_int8(model, spec, (split.x_train[:2048], split.y_train[:2048]), example, workdir=work, threads=args.threads)
    return {"runners": {"ours_fp32_ort": fp32, "ours_int8_ort": int8},
            "accuracy": {"ours_fp32_ort": accuracy_of(fp32, split.x_test, split.y_test),
                         "ours_int8_ort": accuracy_of(int8, split.x_test, split.y_test)},
            "widths": widths_of(model, example), "allocation": alloc.to_dict(), "train_seconds": train_s,
            "train_steps": res.history.epochs[-1].get("step") if res.history.epochs else None,
            "macs": count_macs(model, example), "model": model}


def fine_tune(model: nn.Module, split, steps: int, batch_size: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = len(split.x_train)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def torch_pruning(args, teacher, split, example, work: Path, match_acc: float) -> dict:
    """Magnitude-prune step by step with fine-tuning in between (the same total steps as ours);
    keep the most pruned step whose accuracy still matches ours."""
    import torch_pruning as tp

    model = copy.deepcopy(teacher)
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=args.tp_max_ratio, iterative_steps=args.tp_steps,
                                       ignored_layers=[last])
    total = math.ceil(len(split.x_train) / args.batch_size) * args.epochs
    stages, t0 = [], time.perf_counter()
    for k in range(args.tp_steps):
        pruner.step()
        fine_tune(model, split, total // args.tp_steps, args.batch_size, 1e-3, seed=k)
        acc = accuracy_of(model, split.x_test[:args.select_images], split.y_test[:args.select_images])
        stages.append({"step": k + 1, "ratio": args.tp_max_ratio * (k + 1) / args.tp_steps, "accuracy": acc,
                       "macs": count_macs(model, example), "widths": widths_of(model, example),
                       "model": copy.deepcopy(model)})
    ok = [s for s in stages if s["accuracy"] >= match_acc]  # both on the selection images
    chosen = ok[-1] if ok else stages[0]
    pruned = chosen["model"]
    int8 = quantize_int8(pruned, None, (split.x_train[:2048], split.y_train[:2048]), example, backend="torch-x86")
    fp32_ort = ort_fp32(pruned, work / "tp_fp32.onnx", example, args.threads)
    return {"runners": {"tp_fp32_torch": pruned, "tp_int8_torch_x86": int8, "tp_fp32_ort": fp32_ort},
            "accuracy": {"tp_fp32_torch": accuracy_of(pruned, split.x_test, split.y_test),
                         "tp_int8_torch_x86": accuracy_of(int8, split.x_test, split.y_test)},
            "matched": bool(ok), "chosen_step": chosen["step"], "train_seconds": time.perf_counter() - t0,
            "train_steps": total, "stages": [{k: v for k, v in s.items() if k != "model"} for s in stages],
            "widths": chosen["widths"], "macs": chosen["macs"]}


def time_all(runners: dict, split, threads: int, rounds: int) -> dict:
    out = {}
    for bs in (1, 64):
        x = batch_of(split.x_test, bs)
        t = time_contenders({k: (lambda f=f: f(x)) for k, f in runners.items()}, threads=threads, rounds=rounds)
        out[f"batch{bs}"] = {"latency_ms": t.interleaved_ms, "alone_ms": t.alone_ms, "flagged": t.flagged,
                             "speedup_vs_dense_fp32_torch": t.speedup("dense_fp32_torch"),
                             "speedup_alone_vs_dense_fp32_torch": {k: t.alone_ms["dense_fp32_torch"] / v
                                                                    for k, v in t.alone_ms.items()}}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--speedup", type=float, default=20.0)
    ap.add_argument("--tp-max-ratio", type=float, default=0.9)
    ap.add_argument("--tp-steps", type=int, default=6)
    ap.add_argument("--select-images", type=int, default=2000, help="test images for training-time choices")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's advice
    torch.set_num_threads(1)  # training (2 threads thrash on a loaded 2-core machine); timings run at --threads
    t_start = time.perf_counter()
    split = load_mnist(args.data)
    if args.train_limit:
        split.x_train, split.y_train = split.x_train[:args.train_limit], split.y_train[:args.train_limit]
    work = Path(tempfile.mkdtemp(prefix="against-tp-"))
    teacher = train_teacher(args.model, selection_split(split, args.select_images), args.teacher_epochs, lr=1e-3,
                            batch_size=args.batch_size).eval()
    example = batch_of(split.x_test, 2)
    # the target's reference: the least of three medians, so a load spike cannot set it
    dense_ms = min(alone_ms(teacher, batch_of(split.x_test, 64), args.threads) for _ in range(3))
    target_ms = dense_ms / args.speedup
    us = ours(args, teacher, split, example, work, target_ms)
    sel = selection_split(split, args.select_images)
    match = max(accuracy_of(us["runners"][k], sel.x_test, sel.y_test) for k in us["runners"])  # ours, on the same images
    them = torch_pruning(args, teacher, split, example, work, match)
    runners = {"dense_fp32_torch": teacher, **us["runners"], **them["runners"]}
    result = {
        "command": (f"python benchmarks/against_torch_pruning.py --data {args.data} --model {args.model} "
                    f"--teacher-epochs {args.teacher_epochs} --epochs {args.epochs} --batch-size {args.batch_size} "
                    f"--speedup {args.speedup} --tp-max-ratio {args.tp_max_ratio} --tp-steps {args.tp_steps} "
                    f"--threads {args.threads} --runs {args.runs} --select-images {args.select_images}"
                    + (f" --train-limit {args.train_limit}" if args.train_limit else "")),
        "threads": args.threads, "train_rows": len(split.x_train),
        "target": {"latency_ms_b64": target_ms, "dense_fp32_torch_ms_b64_at_allocation": dense_ms, "speedup": args.speedup},
        "accuracy": {"dense_fp32_torch": accuracy_of(teacher, split.x_test, split.y_test), **us["accuracy"], **them["accuracy"],
                     "note": "fp32 ONNX Runtime runs the same fp32 model as PyTorch: tp_fp32_ort = tp_fp32_torch"},
        "timing": time_all(runners, split, args.threads, args.runs),
        "macs_per_sample": {"dense": count_macs(teacher, example), "ours": us["macs"], "torch_pruning": them["macs"]},
        "widths": {"dense": widths_of(teacher, example), "ours": us["widths"], "torch_pruning": them["widths"]},
        "ours": {k: us[k] for k in ("allocation", "train_seconds")},
        "torch_pruning": {k: them[k] for k in ("matched", "chosen_step", "stages", "train_seconds", "train_steps")},
        "wall_seconds": time.perf_counter() - t_start,
    }
    out = Path(f"benchmarks/results/against_torch_pruning_{args.model}.json")
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(json.dumps({k: result[k] for k in ("accuracy", "timing", "widths")}, indent=1, default=float))


if __name__ == "__main__":
    main()

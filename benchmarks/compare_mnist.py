"""Joint vs sequential on MNIST at Deep Compression's operating points (LeNet-300-100, LeNet-5),
and on a small ResNet with BatchNorm (`--model resnet`, no published reference point), a small
MobileNetV2 (`--model mobilenet`: depthwise separable convolutions, inverted residuals) and a 1-D CNN
(`--model seqcnn`: Conv1d and BatchNorm1d over the image's columns as a sequence, the shape of an audio model).

    nice -n 10 .venv/bin/python benchmarks/compare_mnist.py --model lenet300
    nice -n 10 .venv/bin/python benchmarks/compare_mnist.py --model lenet5

Each writes benchmarks/results/compare_<model>/ (compare.json, compare.csv, pareto.png with
Deep Compression's published point, runs/...). The defaults (3 seeds) took 8 minutes
(LeNet-300-100) and 28 minutes (LeNet-5) here, the two side by side on 2 shared CPU cores
with one thread each, so they use far fewer epochs than Deep Compression's; the numbers in
BENCHMARKS.md are exactly what these commands printed.
The recipe adds small sparsity/quantization regularizers so that gradient coordination has
auxiliary terms to coordinate (without them task and distill rarely conflict and all three
joint variants train identically).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from jointcompress.compare import BENCHMARK_VARIANTS, CompareSpec, plot_pareto, run_compare
from jointcompress.data import load_mnist
from jointcompress.devices import resolve_device
from jointcompress.recipe import parse_recipe

MNIST = "../shared/datasets/mnist/mnist.npz"  # relative to the repository root, as the datasets README says
DEEP_COMPRESSION = {"lenet300": ("Deep Compression (Han et al. 2016)", 40.0, 1.58),
                    "lenet5": ("Deep Compression (Han et al. 2016)", 39.0, 0.74)}
GOALS = {"lenet300": (60.0, 1.60), "lenet5": (50.0, 0.80)}  # the small ResNet has no published reference point
DEFAULTS = {  # sized for <= ~30 min each on 2 CPU cores shared with other jobs (far below Deep Compression's epochs)
    "lenet300": {"ratios": "40,60", "seeds": 3, "epochs": 4, "teacher_epochs": 6},
    "lenet5": {"ratios": "40,50", "seeds": 3, "epochs": 2, "teacher_epochs": 3},
    # BatchNorm and residual couplings: the joint recipe on a model unlike the LeNets (its BatchNorm
    # tensors, stored in fp32, set a floor under the file: about a third of it at 20x, half at 30x;
    # --norm-format fp16 halves them)
    "resnet": {"ratios": "20,30", "seeds": 3, "epochs": 2, "teacher_epochs": 3},
    # a MobileNetV2-style CNN (depthwise separable convolutions, inverted residuals): 74k weights and 1,632
    # BatchNorm channels, whose four tensors at --norm-format fp16 (13.2 KB) and the steps fill about 57% of a
    # 12x file (27.5 KB), leaving about 12 KB for the weights (25x less than fp32); 20x is below the allocator's floor
    # there, not with --norm-format fp16_folded (each BatchNorm as a scale and a shift: 6.8 KB)
    "mobilenet": {"ratios": "12", "seeds": 3, "epochs": 2, "teacher_epochs": 3},
    # a 1-D CNN (Conv1d + BatchNorm1d, a residual block) reading each image as a sequence of columns:
    # the shape of an audio or sensor model
    "seqcnn": {"ratios": "30", "seeds": 3, "epochs": 2, "teacher_epochs": 3},
    # a small vision transformer (torch's nn.TransformerEncoder, its attention converted to Linear
    # projections by attention.mha_to_linear): LayerNorm, attention and MLP weights
    "vit": {"ratios": "30", "seeds": 3, "epochs": 2, "teacher_epochs": 3},
    # an LSTM reading each image as a sequence of rows (torch's nn.LSTM, converted to Linear layers by
    # recurrent.rnn_to_linear): input and recurrent weights, the shape of a speech or sensor model
    "lstm": {"ratios": "30", "seeds": 3, "epochs": 2, "teacher_epochs": 3},
}


def recipe(model: str, epochs: int, min_keep: float = 0.01, bits: int = 4, norm_format: str = "auto",
           scale_format: str = "fp16", recalibrate_norms: int = 0):
    return parse_recipe({
        "name": f"{model}-mnist-compare", "model": model, "mode": "joint",
        "techniques": [
            {"type": "prune_unstructured", "sparsity": 0.9, "end": 0.6, "regularization": 1.0, "min_keep": min_keep},
            {"type": "quant_lsq", "bits": bits, "start": 0.3, "regularization": 0.1, "norm_format": norm_format,
             "scale_format": scale_format},
            {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7, "cache_teacher": True},
        ],
        "training": {"epochs": epochs, "lr": 1e-3, "batch_size": 128, "recalibrate_norms": recalibrate_norms},
        # per term (task, distillation, size each its own gradient), as every stored *-pcgrad / *-scale
        # result was measured; joint-acc-pcgrad turns accuracy_as_one on (the library's default)
        "coordination": {"strategy": "none", "every": 20, "log_every": 50, "accuracy_as_one": False},
    }, source="benchmarks/compare_mnist.py")


def balanced_subset(split, n: int, seed: int = 0):
    """`n` training images, the same number from every class (fixed seed): the scarce-data case."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(seed)
    classes = int(split.y_train.max()) + 1
    picks = []
    for c in range(classes):
        idx = torch.nonzero(split.y_train == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[: n // classes]])
    idx = torch.cat(picks)
    return replace(split, x_train=split.x_train[idx], y_train=split.y_train[idx], name=f"{split.name}-{len(idx)}")


def add_layers(out: Path) -> None:
    """Write each run's per-layer widths and kept weights (from its artifact's manifest) into
    OUT/compare.json, for results made before compare recorded them itself."""
    from jointcompress.compare import layer_widths

    path = out / "compare.json"
    result = json.loads(path.read_text())
    for row in result["runs"]:
        row["layers"] = layer_widths(out / row["dir"] / "artifact")
    result["layers_command"] = " ".join(["nice -n 10 .venv/bin/python benchmarks/compare_mnist.py"] + sys.argv[1:])
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def gpu_machine(device: str, threads: int) -> str:
    """The GPU a run trained on and the versions beside it, as BENCHMARKS.md's "On a GPU" prints them."""
    import onnxruntime
    import transformers

    return (f"one {torch.cuda.get_device_name(device)}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"onnxruntime {onnxruntime.__version__}; {os.cpu_count()} CPU cores, torch.set_num_threads({threads})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--add-layers", type=Path, metavar="DIR",
                    help="only add per-layer widths from DIR/runs/*/artifact to DIR/compare.json, then exit")
    ap.add_argument("--model", choices=sorted(DEFAULTS))
    ap.add_argument("--data", default=MNIST)
    ap.add_argument("--ratios")
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="run seeds FIRST_SEED .. FIRST_SEED+SEEDS-1 (to extend an earlier run with more seeds)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--teacher-epochs", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-images", type=int, help="class-balanced subset of the training set (the scarce-data case)")
    ap.add_argument("--min-keep", type=float, default=0.01,
                    help="prune_unstructured.min_keep of the sequential pipeline (lower it for targets its floor cannot reach)")
    ap.add_argument("--bits", type=int, default=4,
                    help="quant_lsq.bits of every variant (the allocator may still lower it for sequential if the target needs it)")
    ap.add_argument("--norm-format", choices=("fp32", "fp16", "fp16_folded", "auto"), default="fp32",
                    help="quant_lsq.norm_format of every variant: fp16 trains BatchNorm/LayerNorm as stored at half the bytes; "
                         "fp16_folded also stores each BatchNorm as its inference scale and shift (half fp16's bytes); "
                         "default fp32, as every stored result without this flag was measured (the library's default, "
                         "auto, is fp16 under a size target, which every compare point has)")
    ap.add_argument("--scale-format", choices=("fp16", "log8"), default="fp16",
                    help="quant_lsq.scale_format of every variant: log8 stores each step size in 1 byte instead of 2 "
                         "(default fp16, as every stored result without this flag was measured)")
    ap.add_argument("--recalibrate-norms", type=int, default=0,
                    help="training.recalibrate_norms of every variant: training batches over which BatchNorm's running "
                         "statistics are re-estimated before each evaluation (the library's default is 16); default 0, "
                         "the running averages, as every stored result without this flag was measured")
    ap.add_argument("--variants", help="comma-separated (default: joint-none,joint-scale,joint-pcgrad,sequential; "
                                       "also joint-fisher-none/-pcgrad, joint-bits-none/-pcgrad with learned widths, "
                                       "joint-stiff-none/-pcgrad with a stiffer constraint (penalty 30), "
                                       "joint-early-none/-pcgrad: the stiff one frozen at 30%% of the run, 70%% fine-tuning; "
                                       "joint-paced-none/-pcgrad: Fisher budget, penalty 30, ~1,000 steps of decisions, "
                                       "then fine-tuning (joint-paced-aw-none: with the multiplier's anti-windup; joint-paced-lin-none: on a "
                                       "log-linear goal; joint-paced-obd-none: its landing cuts by Fisher cost per byte; "
                                       "joint-paced-obdrank-none / joint-paced-obdland-none: that one with the size-neutral "
                                       "saliency / the Fisher estimate in the landing only); overlap)")
    ap.add_argument("--device", default="cpu", help="where every teacher and variant trains: cpu, cuda, cuda:N or auto "
                                                    "(artifacts are made on the CPU either way)")
    ap.add_argument("--keep", choices=("best", "last"),
                    help="training.keep of every variant: the state each run ends with, its best evaluated epoch at the "
                         "target (the recipe's default, as every stored result without this flag was measured) or its last "
                         "(the same rule for every variant; docs/reliability.md says why)")
    ap.add_argument("--val-images", type=int,
                    help="training.validation_images of every variant and teacher: training images held out (a fixed "
                         "draw, the same for all; from the --train-images subset when given) to choose the kept epoch "
                         "on; default 0, the test split, as every stored result without this flag was measured")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.add_layers:
        return add_layers(args.add_layers)
    if args.model is None:
        ap.error("--model is required")
    d = DEFAULTS[args.model]
    torch.set_num_threads(args.threads)
    out = args.out or Path(__file__).parent / "results" / f"compare_{args.model}"
    out.mkdir(parents=True, exist_ok=True)
    spec = CompareSpec(ratios=[float(r) for r in (args.ratios or d["ratios"]).split(",")],
                       seeds=args.seeds or d["seeds"], first_seed=args.first_seed, teacher_epochs=args.teacher_epochs or d["teacher_epochs"],
                       variants=tuple(args.variants.split(",")) if args.variants else BENCHMARK_VARIANTS, keep=args.keep,
                       device=str(resolve_device(args.device)), validation_images=args.val_images)
    split = load_mnist(args.data)
    if args.train_images:
        split = balanced_subset(split, args.train_images)
    t0 = time.perf_counter()
    result = run_compare(recipe(args.model, args.epochs or d["epochs"], args.min_keep, args.bits, args.norm_format,
                                args.scale_format, args.recalibrate_norms), split,
                         args.model, spec, out,
                         log=lambda m: print(f"[{time.perf_counter() - t0:6.0f}s] {m}", flush=True))
    result["wall_seconds"] = time.perf_counter() - t0
    if spec.device.startswith("cuda"):  # BENCHMARKS.md "On a GPU" names the machine
        result["machine"] = gpu_machine(spec.device, args.threads)
    result["command"] = " ".join(["nice -n 10 .venv/bin/python benchmarks/compare_mnist.py"] + sys.argv[1:])
    result["reference"] = {"deep_compression": DEEP_COMPRESSION.get(args.model), "goal": GOALS.get(args.model)}
    (out / "compare.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot_pareto(result, out / "pareto.png", references=[DEEP_COMPRESSION[args.model]] if args.model in DEEP_COMPRESSION else [])
    for s in sorted(result["summary"], key=lambda s: (s["ratio_target"], s["variant"])):
        print(f"{s['variant']:14s} target {s['ratio_target']:>4g}x  achieved {s['ratio_mean']:6.1f}x  "
              f"error {100 * s['error_mean']:.2f}% [{100 * (1 - s['accuracy_max']):.2f}-{100 * (1 - s['accuracy_min']):.2f}] n={s['n']}")
    print(f"uncompressed error: {[round(100 * (1 - u['accuracy']), 2) for u in result['uncompressed']]}; wall {result['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()

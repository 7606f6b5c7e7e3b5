"""jointcompress vs Torch-Pruning + int8, side by side, at equal threads and equal accuracy.

    .venv/bin/python benchmarks/against_torch_pruning.py --data ../shared/datasets/mnist/mnist.npz --model lenet5 \
        --teacher-epochs 8 --epochs 4 --speedup 20 --both-batches False --teacher /tmp/jc-teacher-lenet5-e8.safetensors
    .venv/bin/python benchmarks/against_torch_pruning.py --data ../shared/datasets/mnist/mnist.npz --model resnet \
        --teacher-epochs 4 --epochs 3 --train-limit 20000 --teacher /tmp/jc-teacher-resnet-e4-20k.safetensors
    .venv/bin/python benchmarks/against_torch_pruning.py --data ../shared/datasets/mnist/mnist.npz --model resnet \
        --teacher-epochs 4 --epochs 1 --speedup 3 --tp-steps 8 --importance-points 4 \
        --teacher /tmp/jc-teacher-resnet-e4-60k.safetensors --out benchmarks/results/against_torch_pruning_resnet_60k_x3.json

The comparison itself lives in jointcompress.deploy.against (its docstring says every step:
latency-table allocation + joint pruning/LSQ/KD for ours; Torch-Pruning's MagnitudePruner
pruned step by step with the same KD fine-tuning and at least the same budget, kept at the
fastest stage whose accuracy matches ours; every ONNX Runtime contender bound with IOBinding;
deploy.timing for every latency). `jointcompress bench --against torch-pruning` runs the same.

--teacher PATH: the dense model's weights (safetensors). If the file is missing, the teacher
is trained (--teacher-epochs, seed 0, deterministic) and saved there, so a second run reuses it
and stays under the time a single benchmark run may take on a shared machine.

--target-ms MS pins the target (ONNX Runtime fp32 ms at batch 64) instead of dense PyTorch's
time / --speedup: that time follows the machine's load (the ResNet's dense batch 64 read from 24
to 83 ms in runs of one day on the shared machine), so a re-run meant to compare with a stored
result passes the stored result's target.latency_ms_b64, e.g. the x5 point again:
    .venv/bin/python benchmarks/against_torch_pruning.py --data ../shared/datasets/mnist/mnist.npz --model resnet \
        --teacher-epochs 4 --epochs 1 --speedup 5 --tp-steps 8 --importance-points 4 --target-ms 14.941730700229527 \
        --teacher /tmp/jc-teacher-resnet-e4-60k.safetensors --out benchmarks/results/against_torch_pruning_resnet_60k_x5_v3.json

Writes benchmarks/results/against_torch_pruning_<model>.json (with this command).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

from jointcompress.data import load_mnist
from jointcompress.deploy.against import AgainstConfig, dense_teacher, run_against


def parse() -> tuple[argparse.Namespace, AgainstConfig]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--teacher", default=None, help="dense weights (safetensors): loaded, or trained and saved there")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--workdir", default=None, help="where the contenders' ONNX files stay (default: a new temp dir); "
                    "benchmarks/against_retime.py re-times them from there")
    ap.add_argument("--shared-machine", default="not stated (pass --shared-machine)",
                    help="what else ran on the machine (recorded beside the load averages at the start and the end)")
    defaults = AgainstConfig()
    for f in AgainstConfig.__dataclass_fields__.values():
        value = getattr(defaults, f.name)
        if isinstance(value, list):  # e.g. --drop-blocks layer1,layer2.0; --strides 1,2
            item = int if value and isinstance(value[0], int) else str
            ap.add_argument("--" + f.name.replace("_", "-"), type=lambda v, item=item: [item(s) for s in v.split(",") if s],
                            default=value)
            continue
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value) if value is not None \
            else float if "float" in str(f.type) else str if "str" in str(f.type) else int
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=value)
    args = ap.parse_args()
    return args, AgainstConfig(**{k: getattr(args, k) for k in AgainstConfig.__dataclass_fields__})


def command_of(args, cfg: AgainstConfig) -> str:
    parts = [f"python benchmarks/against_torch_pruning.py --data {args.data}"]
    parts += [f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(cfg).items()
              if v is not None and v != []]
    parts += [f"--teacher {args.teacher}"] if args.teacher else []
    parts += [f"--train-limit {args.train_limit}"] if args.train_limit else []
    parts += [f"--out {args.out}"] if args.out else []
    parts += [f"--workdir {args.workdir}"] if args.workdir else []
    return " ".join(parts)


def main():
    args, cfg = parse()
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's advice
    torch.set_num_threads(1)  # training (2 threads thrash on a loaded 2-core machine); timings run at --threads
    split = load_mnist(args.data)
    if args.train_limit:
        split.x_train, split.y_train = split.x_train[:args.train_limit], split.y_train[:args.train_limit]
    load_before = os.getloadavg()
    teacher, note = dense_teacher(cfg, split, Path(args.teacher) if args.teacher else None)
    ran = run_against(cfg, split, teacher, note, workdir=args.workdir,
                      progress=lambda m: print(m, file=sys.stderr, flush=True))
    machine = {"shared": args.shared_machine, "cpus": os.cpu_count(),
               "load_average_before_after": [load_before, os.getloadavg()]}
    result = {"command": command_of(args, cfg), "machine": machine, **ran}
    out = Path(args.out or f"benchmarks/results/against_torch_pruning_{cfg.model}.json")
    from jointcompress.io import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=1, default=float) + "\n")
    print(json.dumps({k: result[k] for k in ("accuracy", "timing", "widths")}, indent=1, default=float))


if __name__ == "__main__":
    main()

"""What `training.precision: bf16` (the training forward in bfloat16 autocast) changes: the wall time of
a compression run and the accuracy of what it saves, against float32, paired by seed.

    .venv/bin/python benchmarks/precision_cost.py --data ../shared/datasets/mnist/mnist.npz --model lenet5 \
        --ratio 200 --epochs 2 --teacher-epochs 8 --seeds 3

One teacher (float32, trained once), then per seed two runs of `compress()` in the joint form
(`mode: joint` under the size target), alike but for training.precision, alternating which runs first.
Accuracy: the finalized model in float32 on the test split (the last epoch kept: training.keep last,
so neither run chooses on the test split); bytes: the weights file the artifact writer makes. One
thread. Writes benchmarks/results/precision_cost_<model>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from jointcompress import compress  # noqa: E402
from jointcompress.artifact import save  # noqa: E402
from jointcompress.data import accuracy, evaluator, load_mnist  # noqa: E402
from jointcompress.pipeline import train_teacher  # noqa: E402


def recipe(precision: str, ratio: float, epochs: int, seed: int) -> dict:
    return {"mode": "joint", "target": {"ratio": ratio},
            "techniques": [{"type": "prune_unstructured"},
                           {"type": "quant_lsq", "bits": 4},
                           {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7}],
            # BatchNorm's running averages, as its stored results were measured (before training.recalibrate_norms)
            "training": {"epochs": epochs, "seed": seed, "precision": precision, "keep": "last", "recalibrate_norms": 0}}


def one_run(teacher, split, precision: str, ratio: float, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher)
    t0 = time.perf_counter()
    result = compress(student, recipe(precision, ratio, epochs, seed), (split.x_train, split.y_train),
                      evaluator(*split.selection()), teacher=teacher)
    seconds = time.perf_counter() - t0
    spec = result.finalize()
    with tempfile.TemporaryDirectory() as folder:
        size = save(student, spec, Path(folder) / "artifact", example_inputs=result.example_inputs)["weights_file_bytes"]
    return {"precision": precision, "seed": seed, "seconds": round(seconds, 1),
            "test_accuracy": accuracy(student.eval(), split.x_test, split.y_test), "weights_file_bytes": size}


def by_seed(rows: list[dict], key: str) -> dict[str, dict[int, float]]:
    """precision -> seed -> the run's `key`."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        out.setdefault(r["precision"], {})[r["seed"]] = r[key]
    return out


def paired(rows: list[dict], key: str, scale: float = 1.0) -> dict:
    """bf16 minus fp32, per seed, times `scale`: mean, standard error, and whether beyond 2 of them."""
    values = by_seed(rows, key)
    d = scale * np.array([values["bf16"][s] - values["fp32"][s] for s in sorted(values["fp32"])], dtype=float)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"bf16_minus_fp32_mean": float(d.mean()), "se": se, "per_seed": d.tolist(),
            "beyond_2se": bool(abs(d.mean()) > 2 * se) if len(d) > 1 else False}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/datasets/mnist/mnist.npz"))
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--ratio", type=float, default=200.0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    split = load_mnist(args.data)
    teacher = train_teacher(args.model, split, args.teacher_epochs).eval()
    rows = []
    for seed in range(args.seeds):
        for precision in (("fp32", "bf16") if seed % 2 == 0 else ("bf16", "fp32")):
            rows.append(one_run(teacher, split, precision, args.ratio, args.epochs, seed))
            print(json.dumps(rows[-1]), flush=True)
    seconds = by_seed(rows, "seconds")
    speed = [seconds["fp32"][s] / seconds["bf16"][s] for s in range(args.seeds)]
    out = {"command": shlex.join(["python", "benchmarks/precision_cost.py", *sys.argv[1:]]),
           "model": args.model, "target_ratio": args.ratio, "epochs": args.epochs, "threads": 1,
           "teacher_test_accuracy": accuracy(teacher, split.x_test, split.y_test),
           "cpu": cpu_name(), "runs": rows, "fp32_over_bf16_seconds": [round(v, 3) for v in speed],
           "accuracy_points": paired(rows, "test_accuracy", scale=100.0),
           "bytes": paired(rows, "weights_file_bytes"), "wall_seconds": round(time.perf_counter() - t0, 1)}
    path = Path(args.out or ROOT / f"benchmarks/results/precision_cost_{args.model}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()

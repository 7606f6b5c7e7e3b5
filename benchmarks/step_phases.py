"""Where the time of one joint step goes, phase by phase, beside a plain step (the issue's goal:
a joint step with the size term and PCGrad every 10 steps at most 2x a plain one).

    .venv/bin/python benchmarks/step_phases.py --data ../shared/datasets/mnist/mnist.npz --threads 1 \
        --out benchmarks/results/step_phases.json

The steppers are benchmarks/step_cost.py's (`budget_pcgrad_every10`: the goal's step;
`paced_none`: the benchmarks' recipe inside its decision window; with `--steppers
form_none,form_pcgrad_every10`, the joint form's, what `mode: joint` trains under a size target,
inside its decision window, where `before_step` is the Fisher estimate's fold). Each joint step is the
training loop's own Trainer.step, timed whole and, through its calls on the session, the
recovery and the optimizer, phase by phase; a plain step (forward, cross-entropy, backward,
Adam) is timed between two joint steps, so both see the same machine, its three phases apart.
Also the quantized layers' weights alone (the parametrizations' forward, no matmul), per layer:
their cost barely depends on the layer's size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict

import torch

import step_cost
from jointcompress.artifact.size import dense_fp32_bytes
from jointcompress.data import load_dataset
from jointcompress.models import build_model

DEFAULT_STEPPERS = "budget_pcgrad_every10,paced_none"


def timed(fn, samples: list):
    """`fn` with each call's milliseconds appended to `samples`."""
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        samples.append((time.perf_counter() - t0) * 1e3)
        return out
    return call


def instrument(trainer, times: dict) -> None:
    """Time the training loop's own calls on this trainer's objects (Trainer.step itself runs
    unchanged): what is not in a phase (reading the terms, the learning rate, clipping) is `rest`."""
    s = trainer.session
    for name, owner, attr in (("update", s, "update_techniques"), ("forward", s, "forward_terms"),
                              ("backward", s, "backward"), ("gradient_check", trainer.recovery, "bad_gradient"),
                              ("before_step", s, "before_step"), ("optimizer", s.optimizer, "step"),
                              ("after_step", s, "after_step")):
        setattr(owner, attr, timed(getattr(owner, attr), times[name]))


def weight_times(stepper, rounds: int) -> dict:
    """ms to compute each quantized layer's weight (its parametrizations' forward), median."""
    out = {}
    for name, mod in stepper.trainer.model.named_modules():
        if not hasattr(mod, "parametrizations"):
            continue
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            mod.weight
            samples.append((time.perf_counter() - t0) * 1e3)
        out[name] = {"numel": mod.parametrizations.weight.original.numel(), "ms": statistics.median(samples)}
    return out


def measure(stepper, teacher, split, steps: int) -> dict:
    times, plain_times = defaultdict(list), defaultdict(list)
    instrument(stepper.trainer, times)
    plain = step_cost.plain_stepper(teacher, split, plain_times)
    for _ in range(30):
        stepper(); plain()
    for samples in list(times.values()) + list(plain_times.values()):  # the timers hold these lists: emptied
        samples.clear()
    joint_ms, plain_ms = [], []
    for _ in range(steps):
        t0 = time.perf_counter(); stepper(); joint_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter(); plain(); plain_ms.append((time.perf_counter() - t0) * 1e3)
    phases = {k: {"median_ms": statistics.median(v), "mean_ms": statistics.mean(v)} for k, v in times.items()}
    total = statistics.mean(joint_ms)
    phases["rest"] = {"mean_ms": total - sum(p["mean_ms"] for p in phases.values())}
    plain_phases = {k: {"median_ms": statistics.median(v), "mean_ms": statistics.mean(v)} for k, v in plain_times.items()}
    return {"phases": phases, "plain_phases": plain_phases, "joint_mean_ms": total, "plain_mean_ms": statistics.mean(plain_ms),
            "ratio_of_means": total / statistics.mean(plain_ms), "weights_alone": weight_times(stepper, 200)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="digits")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--steppers", default=DEFAULT_STEPPERS, help="comma-separated: budget_pcgrad_every10, paced_none, "
                    "form_none, form_pcgrad_every10 (the joint form: what mode joint trains under a size target)")
    ap.add_argument("--out", default="benchmarks/results/step_phases.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    split = load_dataset(args.data)
    teacher = build_model("lenet300", split.image_size, split.num_classes)
    goal = dense_fp32_bytes(teacher) / 100
    load_before = os.getloadavg()[0]
    recipes = {
        "budget_pcgrad_every10": lambda: step_cost.budget_recipe("pcgrad", 10, goal),
        "paced_none": lambda: step_cost.budget_recipe("none", 1, goal, variant="joint-paced-none"),
        # what `mode: joint` trains under a size target (step_cost.joint_form_recipe), inside its decision window
        "form_none": lambda: step_cost.joint_form_recipe(teacher, split, "none", None, 100.0),
        "form_pcgrad_every10": lambda: step_cost.joint_form_recipe(teacher, split, "pcgrad", 10, 100.0),
    }
    steppers = {}
    for name in (n.strip() for n in args.steppers.split(",") if n.strip()):
        recipe = recipes[name]()
        steppers[name] = step_cost.joint_stepper(teacher, split, recipe.coordination.strategy, recipe=recipe)
    result = {"command": f"python benchmarks/step_phases.py --data {args.data} --threads {args.threads} --steps {args.steps} "
                         f"{'' if args.steppers == DEFAULT_STEPPERS else f'--steppers {args.steppers} '}--out {args.out}",
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                         f"load average {load_before:.1f} before",
              "model": "lenet300", "batch": step_cost.BATCH[0]}
    for name, fn in steppers.items():
        result[name] = measure(fn, teacher, split, args.steps)
    result["machine"] += f" / {os.getloadavg()[0]:.1f} after"
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

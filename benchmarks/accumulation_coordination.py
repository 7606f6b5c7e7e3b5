"""How far PCGrad's update under gradient accumulation was from one batch's, before the session
resolved a step's micro-batches together.

    .venv/bin/python benchmarks/accumulation_coordination.py

LeNet-5 on the embedded digits, the demo's teacher, compressed in the joint form at the demo's
target (`mode: joint`, ratio 100, PCGrad between accuracy and size on every step) in a plain loop
with K micro-batches a step (each term scaled by 1/K, as the Hugging Face Trainer does). At every
step, after the K backward calls, `.grad` of the coordinated parameters holds the sum of the
micro-batches' own projections (what a step took before); `session.settle_gradients()` then puts
the projection of the summed per-term gradients there, which equals one batch's projection
(`tests/test_accumulation_fisher.py`). The script records, per step, the relative distance
||before - after|| / ||after|| and the cosine between the two, and how much PCGrad changed the update
(stats.changed). Each run is repeated with the step taking the summed per-micro-batch projections
(what it took before), and both runs' test accuracies are stored, paired by seed. Writes
benchmarks/results/accumulation_coordination.json.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import jointcompress  # noqa: E402
from jointcompress.data import accuracy, hold_out, load_digits, loader  # noqa: E402
from jointcompress.demo import DEFAULT_MODEL, VALIDATION_IMAGES, demo_recipe  # noqa: E402
from jointcompress.pipeline import builder_for, train_teacher  # noqa: E402


def flat_grads(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def put_grads(params, flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def run(k: int, seed: int, epochs: int, teacher, split, builder, each_on_its_own: bool = False) -> dict:
    """One compression run with k micro-batches a step; per-step distances between the summed
    per-micro-batch projections and the settled one, and the test accuracy at the end. With
    `each_on_its_own` the step takes the summed per-micro-batch projections, as before the settle
    existed (the settled gradient is measured, then put back)."""
    recipe = demo_recipe(DEFAULT_MODEL, epochs, 100.0).model_dump()
    recipe["coordination"] = {"strategy": "pcgrad", "every": 1}
    recipe["training"]["seed"] = seed
    torch.manual_seed(seed)
    model = builder()
    model.load_state_dict(teacher.state_dict())
    batches = loader(split.x_train, split.y_train, recipe["training"]["batch_size"], shuffle=True, seed=seed)
    session = jointcompress.prepare(model, recipe, total_steps=epochs * len(batches), teacher=teacher,
                                    example_inputs=split.x_train[:2])
    optimizer = torch.optim.Adam(session.param_groups(lr=recipe["training"]["lr"]))
    session.bind(optimizer)
    rows = []
    for _ in range(epochs):
        for xb, yb, *_ in batches:
            optimizer.zero_grad()
            stats = None
            for xm, ym in zip(xb.chunk(k), yb.chunk(k)):
                terms = session.loss(model(xm), (xm, ym))
                stats = session.backward({n: t * (len(xm) / len(xb)) for n, t in terms.items()})
            params = session.coordinator.params
            before = flat_grads(params).clone()
            session.settle_gradients()
            after = flat_grads(params)
            if stats is not None and float(after.norm()) > 0:
                rows.append({"step": session.step, "changed": stats.changed,
                             "distance": float((before - after).norm() / after.norm()),
                             "cosine": float(torch.nn.functional.cosine_similarity(before, after, dim=0))})
            if each_on_its_own:
                put_grads(params, before)
            session.before_step()
            optimizer.step()
            session.after_step()
    return {**summarize(rows), "accuracy": accuracy(model.eval(), split.x_test, split.y_test)}


def summarize(rows: list[dict]) -> dict:
    d = np.array([r["distance"] for r in rows])
    c = np.array([r["cosine"] for r in rows])
    ch = np.array([r["changed"] for r in rows])
    return {"measured_steps": len(rows), "distance_median": float(np.median(d)), "distance_mean": float(d.mean()),
            "distance_max": float(d.max()), "cosine_min": float(c.min()), "cosine_median": float(np.median(c)),
            "changed_median": float(np.median(ch))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--micro-batches", default="2,4,8")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)  # the demo recipe's
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/accumulation_coordination.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    split = hold_out(load_digits(), VALIDATION_IMAGES)
    builder = builder_for(DEFAULT_MODEL, split)
    teacher = train_teacher(DEFAULT_MODEL, split, 15, lr=demo_recipe(DEFAULT_MODEL, None, 100.0).training.lr)
    results, before = {}, {}
    for k in (int(v) for v in args.micro_batches.split(",")):
        results[str(k)] = [run(k, seed, args.epochs, teacher, split, builder) for seed in range(args.seeds)]
        before[str(k)] = [run(k, seed, args.epochs, teacher, split, builder, each_on_its_own=True)
                          for seed in range(args.seeds)]
        print(k, json.dumps(results[str(k)]), json.dumps(before[str(k)]), flush=True)
    out = {"command": shlex.join(["python", "benchmarks/accumulation_coordination.py", *sys.argv[1:]]),
           "model": DEFAULT_MODEL, "data": "digits (embedded)", "target_ratio": 100.0, "epochs": args.epochs,
           "coordination": "pcgrad, every step, accuracy_as_one", "by_micro_batches": results,
           "each_on_its_own": before, "test_images": len(split.x_test),
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()

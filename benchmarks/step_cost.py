"""Cost of one joint training step (prune + 4-bit LSQ + KD, or the size budget's dead-zone LSQ +
learned widths + KD) per coordination strategy, relative to a plain training step of the same
model, measured in one process, interleaved.

    .venv/bin/python benchmarks/step_cost.py --data ../shared/datasets/mnist/mnist.npz --model lenet300 \
        --threads 1 --batch 128 --out benchmarks/results/step_cost_budget.json

A plain step: forward, cross-entropy, backward, Adam step on the uncompressed model, with
PyTorch's default Adam (`plain`, the for-loop implementation on CPU) and with the multi-tensor
Adam the session itself builds (`plain_foreach`: the same optimizer code on both sides).
A joint step: Trainer.step with masks and quantizers attached and the teacher's logits
cached (as the demo recipe does), with four loss terms (task, distill, sparsity and quant
regularizers); `none` takes one backward of the summed loss, `scale` and `pcgrad` measure
every step (every: 1), i.e. one backward per loss term. `none_no_regularizers` is the
default recipe's step (task + distill only). `budget_*`: the joint mode's step with the size
term (size_budget), its quantizer compiled (quant_lsq.compile: auto compiles a run this long,
10,000 steps); `budget_pcgrad_every10_eager` is the same step with compile: false.
`paced_none` / `paced_pcgrad_every10`: the step of the recipe the benchmarks measure everywhere
(joint-paced-none: fixed widths, the Fisher saliency on the dead zones, penalty 30), inside its
decision window.
`paced_none_autograd_saliency`: `paced_none` with the Fisher saliency's dead-zone gradient taken
through an autograd graph, as before its closed form (techniques/saliency.py).
`*_before_fused`: the step with the multi-tensor Adam, the size term recorded through autograd and
the Fisher fold with a temporary on every step, as before the fused Adam, SizeTerm, the one-pass fold
and the learned width's paced folds (learned_width.FISHER_EVERY).
`form_none` / `form_pcgrad_every10`: the step of the joint form, what `mode: joint` trains under a
size target (joint_form.py: the paced budget with the Fisher estimate ordering the landing, fixed
widths; made from a prune + quantize + distill recipe as compress() makes it), with its default
coordination (none, measuring only on the steps it logs) and with PCGrad every 10 steps (accuracy
as one gradient, the default): the issue's goal step for what a user runs today. They are timed
inside the decision window; `form_none_after_freeze` is the joint form's step after the freeze
(the pattern and widths fixed, no size term), the step of the rest of the run (70% of a run of
5,000 steps or more: the paced window closes at 20% of such a run and the pattern freezes at 30%).
`budget_acc_pcgrad_every10`: the goal's step with coordination.accuracy_as_one (PCGrad between
accuracy, task + distill as one gradient, and size), the library's default since it was measured here;
every other stepper coordinates per term (accuracy_as_one: false), as the stored results were measured.
`*_torch_compile`: the step with the quantizer's compiled kernels called through torch.compile
(TorchDynamo's guards and wrappers on every call), as before techniques/traced_kernel.py.

`--steppers a,b` times only those (and plain): the steps a question is about, without the twenty-odd others of
the full rotation (whose readings agree with the pair's: step_cost_runs_pair.json against step_cost_runs_settle.json).
Every stepper is also timed alone (its samples one after another, after the interleaved rounds), and a median more
than 20% off its interleaved one is flagged (`interleaved_differs_from_alone`).

Each sample times `--steps` consecutive steps; the reported numbers are per step: medians (the
typical step) and means (which include the size budget's calibration when one falls in a
sample), in wall-clock time and in the process's CPU time (less sensitive to other processes
on a shared machine). The first call of each stepper (where torch.compile compiles) is timed
apart. Not in a timed step, reported apart with what they add per step: the size budget's
calibration and the training loop's snapshot for non-finite recovery (every 50 steps).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from jointcompress import techniques as tech
from jointcompress.api import as_loader, first_inputs
from jointcompress.compare import joint_options
from jointcompress.data import load_dataset
from jointcompress.session import split_batch
from jointcompress.training import Trainer
from jointcompress.models import build_model
from jointcompress.plan import make_plan
from jointcompress.recipe import parse_recipe


BATCH = [128]


def recipe_for(strategy: str, regularized: bool = True, every: int = 1):
    return parse_recipe({
        "training": {"epochs": 1, "batch_size": BATCH[0]},
        "coordination": {"strategy": strategy, "every": every if strategy != "none" else 1000000,
                         "accuracy_as_one": False},  # per term, as the stored results were measured
        "techniques": [
            {"type": "prune_unstructured", "sparsity": 0.9, "scope": "global", "regularization": 0.1 if regularized else 0.0},
            {"type": "quant_lsq", "bits": 4, "start": 0.0, "regularization": 0.01 if regularized else 0.0},
            {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7, "cache_teacher": True},
        ],
    })


def budget_recipe(strategy: str, every: int, target_bytes: float, compile="auto", variant: str | None = None,
                  accuracy_as_one: bool = False):
    """The joint recipe with the size term: dead-zone LSQ + learned bits + size_budget + KD; with
    `variant` (a compare variant such as joint-paced-none), that variant's size_budget options and
    widths instead (the paced recipe: fixed widths, the Fisher saliency on the dead zones);
    `accuracy_as_one`: the coordination resolves accuracy (task + distill) against size only."""
    budget = {"end": 0.6, "freeze": 0.8}
    learn_bits, nonzero_grid = True, False
    if variant is not None:
        budget = joint_options(variant, total_steps=10_000)
        learn_bits = budget.pop("learn_bits", False)
        nonzero_grid = budget.pop("nonzero_grid", False)
    return parse_recipe({
        "training": {"epochs": 1, "batch_size": BATCH[0]},
        "coordination": {"strategy": strategy, "every": every if strategy != "none" else 1000000,
                         "accuracy_as_one": accuracy_as_one},
        "techniques": [
            {"type": "quant_lsq", "bits": 4, "zero_level": True, "compile": compile, "learn_bits": learn_bits,
             "nonzero_grid": nonzero_grid},
            {"type": "size_budget", "target_bytes": target_bytes, **budget},
            {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7, "cache_teacher": True},
        ],
    })


def joint_form_recipe(teacher, split, strategy: str, every: int | None, ratio: float):
    """What `mode: joint` trains under a size target (joint_form.py: the paced Fisher-landing budget,
    fixed widths), made as compress() and prepare() make it: a prune + 4-bit quantize + distill recipe
    with `target: {ratio}`, in its joint form, the target resolved on the model. `every`: None keeps
    the strategy's default (none: measure only on the steps it logs)."""
    from jointcompress.joint_form import as_joint_form
    from jointcompress.targets import resolve_target

    recipe = parse_recipe({
        "mode": "joint", "target": {"ratio": ratio},
        "training": {"epochs": 1, "batch_size": BATCH[0]},
        "coordination": {"strategy": strategy, "every": every},
        "techniques": [
            {"type": "prune_unstructured", "sparsity": 0.9},
            {"type": "quant_lsq", "bits": 4},
            {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7, "cache_teacher": True},
        ],
    })
    recipe, _ = as_joint_form(recipe)
    loader = as_loader((split.x_train, split.y_train), BATCH[0], 0)
    return resolve_target(copy.deepcopy(teacher), recipe, first_inputs(loader))


def joint_stepper(teacher, split, strategy, regularized=True, every=1, recipe=None, after_freeze=False):
    """Trainer.step of `recipe` at step 100 on (mid-ramp: soft masks, all terms live), or with
    `after_freeze` from the step after the size budget's freeze on (the freeze carried out as the
    loop does it: the pattern fixed, the size term and the dead zones gone from the step)."""
    recipe = recipe or recipe_for(strategy, regularized, every)
    loader = as_loader((split.x_train, split.y_train), BATCH[0], 0)
    model = copy.deepcopy(teacher)
    techniques = [tech.build(c) for c in recipe.techniques]
    plan = make_plan(techniques, 10_000, recipe)
    trainer = Trainer(model, techniques, plan, recipe, loader, lambda m: {"accuracy": 0.0}, first_inputs(loader), teacher=teacher)
    trainer.session.start()
    batches = list(loader)[:20]
    state = {"i": 0}
    for b in batches:  # fill the teacher-logit cache, as after the first epoch
        trainer.session._teacher_logits(split_batch(b))
    first = 100
    if after_freeze:
        budget = next(t for t in techniques if t.kind == "size_budget")
        first = plan.freeze[id(budget)]
        trainer.session.step = first
        trainer.session.advance_schedule()
        first += 1

    def step():
        trainer.step(batches[state["i"] % len(batches)], first + state["i"])
        state["i"] += 1

    step.trainer = trainer
    return step


def calibration_cost(stepper, total_steps: int = 10_000) -> dict:
    """The size budget's calibration (the real file encoded on a finalized copy), which runs every
    `calibrate_every` steps (default total_steps // 40) and so is not in a median step: its time,
    median of 3, and what it adds per step at that cadence."""
    trainer = stepper.trainer
    budget = next(t for t in trainer.techniques if t.kind == "size_budget")
    every = budget.config.calibrate_every or max(1, total_steps // 40)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        budget.calibrate(trainer.model)
        times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    return {"calibration_ms": ms, "calibrate_every": every, "amortized_ms_per_step": ms / every}


def snapshot_cost(stepper, med: dict) -> dict:
    """The training loop's in-memory snapshot for non-finite recovery (Recovery.take_good: model,
    techniques, optimizer), taken every `snapshot_every` steps outside Trainer.step and so not in a
    timed step: its time, median of 5, what it adds per step, and the goal's steps' ratios with it."""
    recovery = stepper.trainer.recovery
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        recovery.take_good(0)
        times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    per_step = ms / recovery.snapshot_every
    return {"snapshot_ms": ms, "snapshot_every": recovery.snapshot_every, "amortized_ms_per_step": per_step,
            "ratio_to_plain_with_snapshot": {k: (med[k] + per_step) / med["plain"]
                                             for k in ("budget_pcgrad_every10", "budget_acc_pcgrad_every10") if k in med}}


def plain_stepper(teacher, split, times: dict | None = None, **adam):
    """A plain PyTorch step; `adam`: the optimizer's implementation flags (default: PyTorch's own
    choice, the for-loop Adam on CPU; foreach=True: the multi-tensor Adam the session builds).
    With `times` (name -> list), its forward with the cross-entropy, backward and Adam step are
    each timed into it, in ms (benchmarks/step_phases.py)."""
    model = copy.deepcopy(teacher)
    opt = torch.optim.Adam(model.parameters(), 1e-3, **adam)
    loader = as_loader((split.x_train, split.y_train), BATCH[0], 0)
    batches = list(loader)[:20]
    state = {"i": 0}

    def step():
        x, y = batches[state["i"] % len(batches)][:2]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        state["i"] += 1

    def phased_step():
        x, y = batches[state["i"] % len(batches)][:2]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        for name, a, b in (("forward", t0, t1), ("backward", t1, t2), ("optimizer", t2, t3)):
            times[name].append((b - a) * 1e3)
        state["i"] += 1

    return step if times is None else phased_step


def with_autograd_saliency(stepper):
    """`stepper` whose size budget takes the Fisher saliency's dead-zone gradient through an
    autograd graph per layer (the implementation before saliency.py's closed form; the same
    gradient to float rounding, tests/test_fisher_budget.py): the reference its speed-up is read against."""
    from jointcompress.techniques.zero_level import GATE_TEMPERATURE

    budget = next(t for t in stepper.trainer.techniques if t.kind == "size_budget")
    sal = budget.saliency

    def dead_zone_grad(q, w, fisher):
        cost = sal.cost(q, w)
        with torch.enable_grad():
            v = (w.detach() / q.effective_step().detach()).abs()
            pruned = 1 - torch.sigmoid((v - q.dead_zone()) / GATE_TEMPERATURE)
            grad, = torch.autograd.grad((cost * pruned).sum(), q.dead_zone_raw)
        return grad

    sal._dead_zone_grad = dead_zone_grad  # add_gradient's per-layer gradient (rank mode's projection stays)
    return stepper


def as_before_fused(stepper):
    """`stepper` with the optimizer, the size term and the Fisher fold as they were before the fused
    Adam (session.fused_or_foreach), the size term's single node (size_budget.SizeTerm) and the
    two-pass fold (learned_width.FisherDiagonal.fold): the multi-tensor Adam, the size term recorded
    through autograd (estimate()), the fold with a temporary, every step (the learned width's noise
    price then computed every step too). The same numbers to float rounding, except the learned
    width's price between the paced folds: the reference the speed-up of those four is read against."""
    from jointcompress.techniques.learned_width import FISHER_DECAY

    session = stepper.trainer.session
    groups = [{**g, "fused": None, "foreach": True} for g in session.optimizer.param_groups]
    session.optimizer = torch.optim.Adam(groups, lr=groups[0]["lr"], foreach=True)
    budget = next(t for t in stepper.trainer.techniques if t.kind == "size_budget")

    def loss_terms(ctx):
        if budget.frozen:
            return {}
        est = budget.estimate(soft=True)
        c = est / budget.goal(ctx.step) - 1
        budget.last_hard = float(est.detach())
        return {"size": budget.lam * c + 0.5 * budget.config.penalty * c * c}

    budget.loss_terms = loss_terms
    for _, q in budget.layers.values():
        fisher = q.fisher

        @torch.no_grad()
        def fold(batch_size, step=None, every=1, loss_scale=None, fisher=fisher):  # every step's gradient, as before FISHER_EVERY (fp32: no scale)
            fisher.watched = None
            if fisher.pending is None:
                return False
            sq = torch.mul(fisher.pending, fisher.pending).mul_(float(batch_size))
            if bool(fisher.seen):
                fisher.value.mul_(FISHER_DECAY).add_(sq, alpha=1 - FISHER_DECAY)
            else:
                fisher.value.copy_(sq)
                fisher.seen.fill_(True)
            fisher.pending = None
            return True

        fisher.fold = fold
    return stepper


def through_torch_compile(stepper):
    """`stepper` with the quantizer's compiled kernels called through torch.compile, as before
    techniques/traced_kernel.py: the same Inductor kernels behind TorchDynamo's per-call guards and
    wrappers (the direct call is refused first, at the cost of one raised exception per kernel
    call): the reference the direct call's saving is read against."""
    from jointcompress.techniques import zero_level_compiled
    from jointcompress.techniques.traced_kernel import KernelUnavailable

    def refused():
        raise KernelUnavailable("timing the torch.compile path")

    def step():
        direct = zero_level_compiled._direct_kernels
        zero_level_compiled._direct_kernels = refused
        try:
            stepper()
        finally:
            zero_level_compiled._direct_kernels = direct

    step.trainer = stepper.trainer
    return step


def steppers(teacher, split, ratio: float = 100.0) -> dict:
    fns = {"plain": plain_stepper(teacher, split), "plain_foreach": plain_stepper(teacher, split, foreach=True),
           "none_no_regularizers": joint_stepper(teacher, split, "none", False)}
    for s in ("none", "scale", "pcgrad"):
        fns[s] = joint_stepper(teacher, split, s)
    fns["pcgrad_every10"] = joint_stepper(teacher, split, "pcgrad", every=10)
    from jointcompress.artifact.size import dense_fp32_bytes

    goal = dense_fp32_bytes(teacher) / ratio
    for s, every in (("none", 1), ("pcgrad", 10)):  # the size term of the joint mode (issue: cost <= 2x plain)
        fns[f"budget_{s}_every{every}"] = joint_stepper(teacher, split, s, recipe=budget_recipe(s, every, goal))
    # the same step whose PCGrad resolves accuracy (task + distill, one gradient) against size
    # (coordination.accuracy_as_one): one backward fewer on the measured steps
    fns["budget_acc_pcgrad_every10"] = joint_stepper(teacher, split, "pcgrad",
                                                     recipe=budget_recipe("pcgrad", 10, goal, accuracy_as_one=True))
    fns["budget_pcgrad_every10_eager"] = joint_stepper(teacher, split, "pcgrad",
                                                       recipe=budget_recipe("pcgrad", 10, goal, compile=False))
    # the recipe the benchmarks recommend (joint-paced-none), inside its decision window
    fns["paced_none"] = joint_stepper(teacher, split, "none", recipe=budget_recipe("none", 1, goal, variant="joint-paced-none"))
    fns["paced_pcgrad_every10"] = joint_stepper(teacher, split, "pcgrad",
                                                recipe=budget_recipe("pcgrad", 10, goal, variant="joint-paced-none"))
    # the nonzero grid, and with each layer's bytes held near its ERK share (size_budget.layer_split: erk, whose
    # per-layer goals are searched again as the budget's goal moves)
    fns["nz_none"] = joint_stepper(teacher, split, "none",
                                   recipe=budget_recipe("none", 1, goal, variant="joint-paced-obdland-nz-none"))
    fns["nz_erk_none"] = joint_stepper(teacher, split, "none",
                                       recipe=budget_recipe("none", 1, goal, variant="joint-paced-obdland-nz-erk-none"))
    # the joint form, what `mode: joint` trains under a size target (the default since it was measured,
    # fixed widths), with its default coordination (none) and with PCGrad every 10 steps
    fns["form_none"] = joint_stepper(teacher, split, "none", recipe=joint_form_recipe(teacher, split, "none", None, ratio))
    fns["form_pcgrad_every10"] = joint_stepper(teacher, split, "pcgrad",
                                               recipe=joint_form_recipe(teacher, split, "pcgrad", 10, ratio))
    # the same after the freeze (the pattern fixed, no size term): the rest of the run's step
    fns["form_none_after_freeze"] = joint_stepper(teacher, split, "none", after_freeze=True,
                                                  recipe=joint_form_recipe(teacher, split, "none", None, ratio))
    # the same step with the saliency's dead-zone gradient taken by autograd, as before its closed form
    fns["paced_none_autograd_saliency"] = with_autograd_saliency(
        joint_stepper(teacher, split, "none", recipe=budget_recipe("none", 1, goal, variant="joint-paced-none")))
    # the same step as before the fused Adam, the size term's single node and the one-pass fold
    fns["paced_none_before_fused"] = as_before_fused(
        joint_stepper(teacher, split, "none", recipe=budget_recipe("none", 1, goal, variant="joint-paced-none")))
    fns["budget_pcgrad_every10_before_fused"] = as_before_fused(
        joint_stepper(teacher, split, "pcgrad", recipe=budget_recipe("pcgrad", 10, goal)))
    # the same steps with the compiled kernels called through torch.compile, as before the direct call
    fns["budget_pcgrad_every10_torch_compile"] = through_torch_compile(
        joint_stepper(teacher, split, "pcgrad", recipe=budget_recipe("pcgrad", 10, goal)))
    fns["paced_none_torch_compile"] = through_torch_compile(
        joint_stepper(teacher, split, "none", recipe=budget_recipe("none", 1, goal, variant="joint-paced-none")))
    return fns


def time_steps(fns: dict, rounds: int, steps: int) -> tuple[dict, dict]:
    """Per stepper, ms per step of every sample in wall-clock and CPU time (interleaved rounds:
    load drifts hit every variant alike); and the seconds of each stepper's first call."""
    first = {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[k] = time.perf_counter() - t0
    for _ in range(3):
        for fn in fns.values():
            fn()
    times = {k: {"wall": [], "cpu": []} for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fn()
            times[k]["wall"].append((time.perf_counter() - t0) / steps * 1e3)
            times[k]["cpu"].append((time.process_time() - c0) / steps * 1e3)
    return times, first


def time_alone(fns: dict, rounds: int, steps: int) -> dict:
    """Per stepper, wall-clock ms per step of `rounds` samples taken one after another with no other stepper in
    between (the check the interleaved rounds are read against: a stepper whose caches the others flush reads
    slower interleaved)."""
    alone = {}
    for k, fn in fns.items():
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            samples.append((time.perf_counter() - t0) / steps * 1e3)
        alone[k] = samples
    return alone


def summary(times: dict, clock: str, stat) -> tuple[dict, dict]:
    """(ms per step, ratio to plain) of one clock and statistic."""
    ms = {k: stat(v[clock]) for k, v in times.items()}
    return ms, {k: ms[k] / ms["plain"] for k in ms}


def chosen(fns: dict, names: str | None) -> dict:
    """The steppers `names` asks for (comma-separated; plain always), all without it; an unknown name is refused."""
    if not names:
        return fns
    wanted = ["plain", *(n.strip() for n in names.split(",") if n.strip() and n.strip() != "plain")]
    unknown = [n for n in wanted if n not in fns]
    if unknown:
        raise SystemExit(f"--steppers: unknown {unknown}; choose from {sorted(fns)}")
    picked = {n: fns[n] for n in wanted}
    fns.clear()
    gc.collect()  # the others' models and optimizers go before anything is timed
    return picked


def cross_ratios(med: dict) -> dict:
    """Steppers against the code before a change, in the same run, where both were timed."""
    pairs = {  # the closed-form saliency against the autograd one
        "paced_none_over_autograd_saliency": ("paced_none", "paced_none_autograd_saliency"),
        # the fused Adam, the size term's single node and the one-pass Fisher fold against the code before them
        "paced_none_over_before_fused": ("paced_none", "paced_none_before_fused"),
        "budget_pcgrad_every10_over_before_fused": ("budget_pcgrad_every10", "budget_pcgrad_every10_before_fused"),
        # the kernels called directly against the same kernels through torch.compile
        "budget_pcgrad_every10_over_torch_compile": ("budget_pcgrad_every10", "budget_pcgrad_every10_torch_compile"),
        "paced_none_over_torch_compile": ("paced_none", "paced_none_torch_compile")}
    return {name: med[a] / med[b] for name, (a, b) in pairs.items() if a in med and b in med}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="digits")
    ap.add_argument("--model", default="lenet300")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed sample")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=100.0, help="the size budget's target: the fp32 weights / ratio")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: stable ratios on a shared machine)")
    ap.add_argument("--steppers", default=None,
                    help="comma-separated steppers to time (plain is always timed); default: all of them")
    ap.add_argument("--out", default="benchmarks/results/step_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    BATCH[0] = args.batch
    torch.manual_seed(0)
    split = load_dataset(args.data)
    teacher = build_model(args.model, split.image_size, split.num_classes)
    fns = chosen(steppers(teacher, split, args.ratio), args.steppers)
    load_before = os.getloadavg()[0]
    times, first = time_steps(fns, args.rounds, args.steps)
    alone = {k: statistics.median(v) for k, v in time_alone(fns, args.rounds, args.steps).items()}
    med, ratio = summary(times, "wall", statistics.median)
    mean, ratio_mean = summary(times, "wall", statistics.mean)
    cpu_med, cpu_ratio = summary(times, "cpu", statistics.median)
    cpu_mean, cpu_ratio_mean = summary(times, "cpu", statistics.mean)
    subset = f" --steppers {args.steppers}" if args.steppers else ""
    result = {
        "command": f"python benchmarks/step_cost.py --data {args.data} --model {args.model} --threads {args.threads} "
                   f"--batch {args.batch}{'' if args.ratio == 100 else f' --ratio {args.ratio:g}'} --rounds {args.rounds} "
                   f"--steps {args.steps}{subset} --out {args.out}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"{os.cpu_count()} cores, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after",
        "median_ms_per_step": med,
        "ratio_to_plain": ratio,
        # the same optimizer implementation as the session's (multi-tensor Adam) on both sides
        "ratio_to_plain_foreach": {k: med[k] / med["plain_foreach"] for k in med} if "plain_foreach" in med else None,
        "mean_ms_per_step": mean, "ratio_to_plain_of_means": ratio_mean,
        "cpu_median_ms_per_step": cpu_med, "cpu_ratio_to_plain": cpu_ratio,
        "cpu_mean_ms_per_step": cpu_mean, "cpu_ratio_to_plain_of_means": cpu_ratio_mean,
        "first_call_seconds": first,  # the compiled kernels are compiled here (cached on disk afterwards)
        # each stepper timed alone (its samples one after another), and where that differs by more than 20% from
        # its interleaved median
        "alone_median_ms_per_step": alone, "alone_ratio_to_plain": {k: alone[k] / alone["plain"] for k in alone},
        "interleaved_differs_from_alone": sorted(k for k in alone if abs(med[k] / alone[k] - 1) > 0.2),
        "targets": {"none": 1.3, "pcgrad": 2.5, "budget_pcgrad_every10": 2.0, "budget_acc_pcgrad_every10": 2.0,
                    "paced_none": 2.0, "paced_pcgrad_every10": 2.0, "form_none": 2.0, "form_pcgrad_every10": 2.0},
    }
    result.update(cross_ratios(med))
    if "budget_pcgrad_every10" in fns:
        result["size_budget_calibration"] = calibration_cost(fns["budget_pcgrad_every10"])
        result["recovery_snapshot"] = snapshot_cost(fns["budget_pcgrad_every10"], med)
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""The Torch-Pruning contender of deploy.against: pruned until its accuracy matches ours.

Why this shape (and why it is not weaker than Torch-Pruning's own recipe): MagnitudePruner
with L2 importance and a uniform per-layer ratio is its documented default, with its own
`round_to` (default here 8, kernel-friendly widths as ours get); ONNX Runtime's speed is not
smooth in the widths (LeNet-5 at batch 64, 1 thread, random weights, alone: 16/40/400 5.9 ms,
16/32/352 1.7 ms, 11/27/275 1.5 ms), so its stages are timed, not assumed; iterative pruning
with fine-tuning between steps is how its examples reach high ratios. Fine-tuning uses the
same loss as ours (KD from the same teacher, same temperature and alpha), Adam at the same lr
and batch, with a cosine decay inside each phase (ours decays over its run). The stages are its
accuracy-vs-speed curve; the candidates for "equal accuracy" then get the rest of the budget,
so none has had fewer training steps than ours.
"""
from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .against import AgainstConfig, accuracy_of, alone_ms, ort_fp32, ort_int8, require_torch_pruning, torch_int8, \
    selection_split, steps_per_epoch, widths_of

MAX_CANDIDATES = None  # no cap: a cap stopped 12-step runs at a stage that still matched, slower than needed


def fine_tune(model: nn.Module, teacher: nn.Module, split, steps: int, cfg: AgainstConfig, seed: int) -> None:
    """`steps` Adam steps of alpha * T^2 * KL + (1 - alpha) * CE, lr cosine-decayed, reshuffled epochs."""
    from ..techniques.distill_kd import hinton_loss

    if steps <= 0:
        return
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    n, order, pos = len(split.x_train), torch.empty(0, dtype=torch.long), 0
    model.train()
    for _ in range(steps):
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        x, y = split.x_train[idx], split.y_train[idx]
        with torch.no_grad():
            t_logits = teacher(x)
        loss = hinton_loss(model(x), t_logits, y, cfg.temperature, cfg.alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def output_layers(model: nn.Module, example) -> list[nn.Module]:
    """The layers whose outputs are the model's (the classifier keeps its classes), as the dependency
    graph finds them. The last registered Linear / Conv2d was taken before: a model that defines its
    head first had a hidden conv kept whole (Torch-Pruning handicapped) and its head pruned to 5 of
    10 classes. Falls back to the last registered layer when the graph names none."""
    from ..graph import discover_groups
    from ..layer_types import COMPRESSIBLE

    modules = dict(model.named_modules())
    _, skipped = discover_groups(model, example)
    found = [modules[name] for name, why in skipped if "model output" in why and isinstance(modules.get(name), COMPRESSIBLE)]
    return found or [m for m in model.modules() if isinstance(m, COMPRESSIBLE)][-1:]


def pruner_for(model: nn.Module, example, cfg: AgainstConfig):
    tp = require_torch_pruning()
    return tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                     pruning_ratio=cfg.tp_max_ratio, iterative_steps=cfg.tp_steps,
                                     ignored_layers=output_layers(model, example), round_to=cfg.tp_round_to or None,
                                     global_pruning=cfg.tp_global)


def stage_curve(teacher: nn.Module, split, example, work: Path, cfg: AgainstConfig, budget: int,
                start: nn.Module | None = None) -> list[dict]:
    """Prune step by step from `start` (default the teacher), fine-tuning budget / tp_steps steps
    after each; every stage's selection accuracy, MACs, widths and ORT fp32 latency (alone, batch 1 and 64)."""
    from ..bench import batch_of, count_macs

    model = copy.deepcopy(teacher if start is None else start)
    pruner = pruner_for(model, example, cfg)
    sel = selection_split(split)
    per_stage, stages = budget // cfg.tp_steps, []
    widths = widths_of(model, example)
    for k in range(cfg.tp_steps):
        pruner.step()
        before, widths = widths, widths_of(model, example)
        if widths == before:  # round_to kept every channel at this ratio: the stage is not what its ratio says
            warnings.warn(f"Torch-Pruning's step {k + 1} (ratio {cfg.tp_max_ratio * (k + 1) / cfg.tp_steps:.2f}) removed "
                          f"no channel (round_to {cfg.tp_round_to} on these widths); its stage equals the one before. "
                          "More steps or a smaller round_to make each stage prune", stacklevel=2)
        fine_tune(model, teacher, split, per_stage, cfg, seed=1000 * cfg.seed + k)
        ort = ort_fp32(model, work / "tp_probe.onnx", example, cfg.threads)
        stages.append({"step": k + 1, "ratio": cfg.tp_max_ratio * (k + 1) / cfg.tp_steps,
                       "selection_accuracy": accuracy_of(model, sel.x_test, sel.y_test), "steps_so_far": per_stage * (k + 1),
                       "macs": count_macs(model, example), "widths": widths, "pruned": widths != before,
                       "ort_fp32_alone_ms": {f"batch{b}": alone_ms(ort, batch_of(split.x_test, b), cfg.threads)
                                             for b in (1, 64)},
                       "model": copy.deepcopy(model)})
    return stages


def matched(teacher: nn.Module, split, stages: list[dict], cfg: AgainstConfig, budget: int, match_acc: float) -> dict:
    """The fastest stage that matches `match_acc` after the whole budget. Candidates: from the
    most pruned stage that matches already, more pruned ones in turn until one fails even
    after the whole budget (at most `MAX_CANDIDATES`; None: as many as there are stages)."""
    sel = selection_split(split)
    ok = [i for i, s in enumerate(stages) if s["selection_accuracy"] >= match_acc]
    first = ok[-1] if ok else 0
    candidates = []
    last = len(stages) if MAX_CANDIDATES is None else min(first + MAX_CANDIDATES, len(stages))
    for i in range(first, last):
        s = stages[i]
        model = copy.deepcopy(s["model"])
        fine_tune(model, teacher, split, budget - s["steps_so_far"], cfg, seed=1000 * cfg.seed + 100 + i)
        acc = accuracy_of(model, sel.x_test, sel.y_test)
        candidates.append({"step": s["step"], "selection_accuracy_full_budget": acc, "model": model,
                           "fine_tune_steps": budget})
        if acc < match_acc:
            break
    fits = [c for c in candidates if c["selection_accuracy_full_budget"] >= match_acc]
    chosen = fits[-1] if fits else candidates[0]
    return {**chosen, "matched": bool(fits),
            "candidates": [{k: v for k, v in c.items() if k != "model"} for c in candidates]}


def torch_pruning(teacher: nn.Module, split, example, work: Path, cfg: AgainstConfig, match_acc: float,
                  start: nn.Module | None = None) -> dict:
    """Torch-Pruning at our accuracy, pruned from `start` (default the teacher) and distilled from the
    teacher: its curve, the matched model, and its four deployments."""
    from ..bench import count_macs

    budget = steps_per_epoch(split, cfg.batch_size) * cfg.epochs
    t0 = time.perf_counter()
    stages = stage_curve(teacher, split, example, work, cfg, budget, start)
    pick = matched(teacher, split, stages, cfg, budget, match_acc)
    train_s = time.perf_counter() - t0
    pruned = pick["model"].eval()
    runners = {"tp_fp32_torch": pruned,
               "tp_int8_torch_x86": torch_int8(pruned, None, split, example, cfg),
               "tp_fp32_ort": ort_fp32(pruned, work / "tp_fp32.onnx", example, cfg.threads),
               "tp_int8_ort": ort_int8(pruned, None, split, example, work / "tp_int8", cfg)}
    return {"runners": runners,
            "accuracy": {k: accuracy_of(f, split.x_test, split.y_test) for k, f in runners.items()},
            "matched": pick["matched"], "chosen_step": pick["step"], "candidates": pick["candidates"],
            "train_seconds": train_s, "train_steps": budget,
            "stages": [{k: v for k, v in s.items() if k != "model"} for s in stages],
            "widths": widths_of(pruned, example), "macs": count_macs(pruned, example)}

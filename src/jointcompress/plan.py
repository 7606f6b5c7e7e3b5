"""When each technique acts: joint (all at once) or sequential (one after another).

A plan gives every technique an attach step, a ramp window and, for sequential runs, a
freeze step; and it splits the run into LR phases (each phase gets its own cosine decay).
Both modes use the same loop and the same total number of steps: that is what makes the
joint-vs-sequential comparison fair.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .techniques.base import Technique


@dataclass
class Phase:
    name: str
    start: int
    end: int


@dataclass
class Plan:
    phases: list[Phase] = field(default_factory=list)
    attach: dict[int, int] = field(default_factory=dict)  # id(technique) -> step
    freeze: dict[int, int] = field(default_factory=dict)  # id(technique) -> step

    @property
    def total_steps(self) -> int:
        return self.phases[-1].end if self.phases else 0


def _within(step: int, total_steps: int) -> int:
    """`step`, or the run's last step where it falls at or after the end: a window that opens or
    closes at step `total_steps` is never reached (steps run 0..total_steps-1), so a mask whose ramp
    ended there never got its final keep and the model ended unpruned without a word
    (`start: 1.0, end: 1.0`, or a one-step run with the default `end: 0.6`)."""
    return min(step, max(0, total_steps - 1))


def _is_prune(t: Technique) -> bool:
    return t.kind.startswith("prune")


def joint_plan(techniques: list[Technique], total_steps: int) -> Plan:
    plan = Plan(phases=[Phase("joint", 0, total_steps)])
    for t in techniques:
        if t.kind == "size_budget" and t.config.decide_steps:
            # the paced window resolved for this run's length (recipe.SizeBudget.paced)
            t.config = t.config.model_copy(update=t.config.paced(total_steps))
        start = _within(round(getattr(t.config, "start", 0.0) * total_steps), total_steps)
        end = _within(round(getattr(t.config, "end", getattr(t.config, "start", 0.0)) * total_steps), total_steps)
        t.window = (start, max(start, end))
        plan.attach[id(t)] = 0 if _is_prune(t) or t.kind == "distill_kd" else start
        if t.kind == "size_budget":  # the zero pattern and widths are fixed, then values fine-tune
            plan.freeze[id(t)] = t.config.freeze_step(t.window[1], total_steps)
            if getattr(t.config, "finetune_phase", False):
                _split_at_freeze(plan, plan.freeze[id(t)], total_steps)
    return plan


def _split_at_freeze(plan: Plan, freeze: int, total_steps: int) -> None:
    """The fine-tuning after the size budget's freeze gets its own LR phase (a cosine from the
    full rate), as the sequential pipeline's fine-tune phases do: under one decay over the whole
    run, the fixed pattern is fine-tuned at a tenth of the rate or less and cannot recover."""
    if 0 < freeze < total_steps:
        plan.phases = [Phase("joint", 0, freeze), Phase("finetune", freeze, total_steps)]


def _split(total: int, fractions: list[float]) -> list[int]:
    """Integer step counts that add up to `total` exactly."""
    bounds = [round(total * sum(fractions[: i + 1])) for i in range(len(fractions))]
    return [b - a for a, b in zip([0] + bounds[:-1], bounds)]


def sequential_plan(techniques: list[Technique], total_steps: int, cfg) -> Plan:
    """prune -> fine-tune -> quantize (QAT) -> fine-tune, distillation (if any) throughout."""
    prune = [t for t in techniques if _is_prune(t)]
    quant = [t for t in techniques if t.kind == "quant_lsq"]
    fr = [cfg.prune, cfg.finetune_after_prune, cfg.quantize, cfg.finetune_after_quantize]
    if not prune:
        fr = [0.0, 0.0, fr[2] + fr[0], fr[3] + fr[1]]
    if not quant:
        fr = [fr[0], fr[1] + fr[2] + fr[3], 0.0, 0.0]
    steps = _split(total_steps, fr)
    if quant and steps[2] + steps[3] == 0:  # LSQ would round the weights after the last step, never trained at its bits
        from .errors import RecipeError

        raise RecipeError(f"sequential: quantize {cfg.quantize:g} and finetune_after_quantize {cfg.finetune_after_quantize:g} "
                          f"leave quant_lsq (the recipe's, or the one its size target adds) no step of the run's "
                          f"{total_steps}: it would round the weights after training and never train them at its bits; "
                          "give the quantize phase a share (e.g. prune 0.4, finetune_after_prune 0.1, quantize 0.4, "
                          "finetune_after_quantize 0.1)")
    names = ["prune", "finetune", "quantize", "finetune_q"]
    plan, at = Plan(), 0
    for name, n in zip(names, steps):
        if n > 0:
            plan.phases.append(Phase(name, at, at + n))
        at += n
    p_start, p_len = 0, steps[0]
    q_start, q_len = steps[0] + steps[1], steps[2]
    for t in techniques:
        if _is_prune(t):
            t.window = (_within(p_start + round(t.config.start * p_len), total_steps),
                        _within(p_start + round(t.config.end * p_len), total_steps))
            plan.attach[id(t)] = 0
            plan.freeze[id(t)] = p_start + p_len
        elif t.kind == "quant_lsq":
            t.window = (q_start, q_start)
            plan.attach[id(t)] = q_start
            plan.freeze[id(t)] = q_start + q_len
        else:
            plan.attach[id(t)] = 0
    return plan


def make_plan(techniques: list[Technique], total_steps: int, recipe) -> Plan:
    if recipe.mode == "sequential":
        return sequential_plan(techniques, total_steps, recipe.sequential)
    return joint_plan(techniques, total_steps)

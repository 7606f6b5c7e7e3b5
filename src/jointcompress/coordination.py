"""Gradient coordination between the named loss terms (task, distill, sparsity, quant).

Each term gets its *own* gradient on the shared parameters (one backward per term through
the same graph; summing first would hide the conflicts). Per parameter group the
coordinator measures how the terms disagree (cosine, fraction of opposite signs) and
resolves it:

- `none`: plain sum (what an ordinary loop does), conflicts only measured;
- `scale`: an auxiliary term (sparsity, quant) whose gradient points against the primary
  objective (task + distill) with cosine below -threshold is damped by `factor` on that group
  (the design notes' "conflict > 0.3 -> x0.5");
- `pcgrad`: Yu et al., 2020: each term's gradient is projected onto the normal plane of every
  other term's gradient it conflicts with (negative dot product), in random order.

`every: k` measures and resolves on every k-th step only; between them `scale` reuses its
last factors and the others take the plain sum with a single backward. `accuracy_as_one` (the
default): on the measured steps of `scale` and `pcgrad` task and distillation are one "accuracy"
term (summed first), so the strategy resolves accuracy against size and the regularizers, not task
against distillation; `none` measures every term apart (it changes no update, so a run's numbers
do not depend on the switch).

Gradient accumulation (K backward calls before one optimizer step): `scale` and `pcgrad` are not
linear, so a measured step keeps its per-term gradients, summed over the micro-batches, and
`settle` (session.before_step) resolves the sum once in place of the micro-batches' own resolutions:
K micro-batches take the update one batch of their samples takes. Under torchrun the ranks' sums are
averaged first, so every rank takes the global batch's update.
"""
from __future__ import annotations

import functools
import operator
import random
from dataclasses import dataclass, field

import torch

from .errors import JointCompressError

PRIMARY = ("task", "distill", "accuracy")  # "accuracy": the two summed (accuracy_as_one)


def pcgrad_weights(gram: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """PCGrad in coefficient space: row i holds c_i with projected g_i' = c_i @ G_flat.

    Every projected gradient is a linear combination of the original ones, so all the dot
    products PCGrad needs come from the K x K Gram matrix: one matmul over the (long)
    gradients instead of K^2 dot products, and the same result.
    """
    k = gram.shape[0]
    coeffs = torch.eye(k, dtype=gram.dtype, device=gram.device)
    columns = gram.unbind(1)
    diag = gram.diag().tolist()  # the K x K scalars as Python floats: the same IEEE doubles, no tensor op each
    for i in range(k):
        c = coeffs[i].clone()
        others = [j for j in range(k) if j != i]
        rng.shuffle(others)
        for j in others:
            dot = float(c @ columns[j])
            if dot < 0 and diag[j] > 0:
                c[j] -= dot / diag[j]
        coeffs[i] = c
    return coeffs


def pcgrad(grads: list[torch.Tensor], rng: random.Random | None = None) -> list[torch.Tensor]:
    """Project each gradient away from the others it conflicts with (Yu et al., 2020)."""
    flat = torch.stack(grads).double()
    coeffs = pcgrad_weights(flat @ flat.T, rng or random.Random(0))
    return [(c @ flat).to(grads[0].dtype) for c in coeffs]


REENTRANT_CHECKPOINT = (
    "coordination: a measured step takes one gradient per loss term (torch.autograd.grad), and activation "
    "checkpointing with use_reentrant=True hides the checkpointed layers' weights from it: torch refuses, or, where "
    "no other weight the step asks for lies before them, their gradients come back as nothing, silently. "
    "Checkpoint with use_reentrant=False (Hugging Face: model.gradient_checkpointing_enable("
    "gradient_checkpointing_kwargs={'use_reentrant': False}), or TrainingArguments(gradient_checkpointing_kwargs=...)); "
    "it saves the same memory")


def graph_nodes(term: torch.Tensor):
    """Each node of the autograd graph behind `term` once (a walk; no backward runs)."""
    seen, todo = set(), [term.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        yield fn
        todo.extend(next_fn for next_fn, _ in fn.next_functions)


def reentrant_checkpoint_in(term: torch.Tensor) -> bool:
    """Whether the graph behind `term` holds a reentrant activation checkpoint (its backward recomputes the
    forward in a nested backward() of its own, which torch.autograd.grad cannot reach into)."""
    return any(fn.name() == "CheckpointFunctionBackward" for fn in graph_nodes(term))


def opposite_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of the entries where both gradients are non-zero that have opposite signs."""
    prod = a * b
    n = int(prod.ne(0).sum())
    return float(prod.lt(0).sum()) / n if n else 0.0


@dataclass
class CoordinationStats:
    step: int
    conflict_rate: float  # share of (term pair, group) with negative cosine
    cosines: dict[str, float] = field(default_factory=dict)  # "a|b@group" -> cosine
    opposite: dict[str, float] = field(default_factory=dict)  # "a|b@group" -> opposite-sign fraction (logged steps)
    damped: dict[str, float] = field(default_factory=dict)  # "term@group" -> factor applied (scale)
    changed: float = 0.0  # ||resolved - sum|| / ||sum||: how much the strategy changed the update

    def as_dict(self) -> dict:
        return {
            "step": self.step,
            "conflict_rate": self.conflict_rate,
            "changed": self.changed,
            "cosines": self.cosines,
            "opposite": self.opposite,
            "damped": self.damped,
        }


class _HeldStep:
    """A measured step's per-term gradients (group -> one row per term) summed over its micro-batches,
    and what their own resolutions put into .grad, until the optimizer step settles them."""

    def __init__(self, step: int, names: list[str], stacked: dict, applied: dict, stats: CoordinationStats,
                 groups: dict[str, list[torch.nn.Parameter]]):
        self.step, self.names, self.stacked, self.applied, self.stats = step, names, stacked, applied, stats
        self.micro_batches = 1
        self._first, self._groups, self._witness = dict(applied), groups, None

    @property
    def witness(self) -> list[torch.nn.Parameter]:
        """The parameters of a group the first resolution gave a non-zero gradient: all zero (or None) again means
        the loop zeroed the gradients since, and a new step began at the same number. Found when first read (a
        second micro-batch, torchrun): a measured step of one batch in one process never reads it, and the scan
        cost a pass over the weights' gradients on every measured step."""
        if self._witness is None:
            self._witness = next((self._groups[g] for g, vec in self._first.items() if bool(vec.any())), [])
            self._first = {}
        return self._witness

    def zeroed(self) -> bool:
        return all(p.grad is None or not bool(p.grad.any()) for p in self.witness)

    def grad_square(self) -> float:
        """The witness parameters' squared gradient norm now: recorded after each backward and read again when
        the step settles, to tell gradients a loop changed in between (clipping before settle_gradients)."""
        return float(sum((p.grad.double() ** 2).sum() for p in self.witness if p.grad is not None))


class GradientCoordinator:
    def __init__(self, config, groups: dict[str, list[torch.nn.Parameter]], seed: int = 0, mean_over_ranks=None,
                 said_changed: bool = False):
        """`said_changed`: the run's warning about gradients changed before settling was said already (by the
        coordinator this one replaces: the session makes a new one whenever techniques attach or freeze)."""
        self.config = config
        self.groups = {k: [p for p in v if p.requires_grad] for k, v in groups.items()}
        self.groups = {k: v for k, v in self.groups.items() if v}
        self.params = [p for v in self.groups.values() for p in v]
        self.factors: dict[str, float] = {}  # "term@group" -> last scale factor
        self.rng = random.Random(seed)
        self._held: _HeldStep | None = None  # a measured step's per-term gradients, until settle
        self.said_changed = said_changed  # gradients a loop changed before settling: said once a run
        self._graph_checked = False  # for reentrant activation checkpointing, on the first measured step
        # under torchrun (group -> tensor averaged over the ranks): `settle` resolves the ranks' averaged gradients,
        # and until then a measured step's .grad holds the plain sum (a rank's own resolution would be replaced,
        # and the sum's average is known from theirs)
        self.mean_over_ranks = mean_over_ranks

    def backward(self, terms: dict[str, torch.Tensor], step: int) -> CoordinationStats | None:
        """Put the coordinated gradient into .grad of every shared parameter."""
        measured = step % self.config.measure_every() == 0 and len(terms) > 1
        if not measured:
            self._plain_backward(terms)
            return None
        terms = self._objectives(terms)
        if len(terms) < 2:  # task and distillation alone, summed: nothing left to coordinate
            self._plain_backward(terms)
            return None
        if not self._graph_checked:  # once: a walk over each term's graph
            self._graph_checked = True
            if any(t.requires_grad and reentrant_checkpoint_in(t) for t in terms.values()):
                raise JointCompressError(REENTRANT_CHECKPOINT)
        per_term = {name: self._grad(t) for name, t in terms.items()}
        names, stacked = list(per_term), self._split(per_term)
        if self.mean_over_ranks is not None and self.config.strategy != "none":  # settle resolves; its stats fill these
            resolved, stats = {g: rows.sum(0) for g, rows in stacked.items()}, CoordinationStats(step, 0.0)
        else:
            resolved, stats = self._resolve(names, stacked, step)
        if self._held is not None and self._held.zeroed():  # read before this backward's gradients land
            self._held = None
        self._assign(resolved)
        self._hold(step, names, stacked, resolved, stats)
        return stats

    def note_gradients(self, step: int) -> None:
        """After a backward's gradients have landed (averaged over the ranks under torchrun): what .grad holds, for
        settle to tell a loop's change in between. Only where settle resolves the step again (not `none`)."""
        held = self._held
        if held is None or held.step != step or self.config.strategy == "none":
            return
        # settle reads it only after a second micro-batch or under torchrun (one batch in one process settles
        # nothing): a pass over the gradients in float64 on every measured step, saved there
        if held.micro_batches > 1 or self.mean_over_ranks is not None:
            held.after_backward = held.grad_square()

    def settle(self, step: int, unit: float = 1.0) -> bool:
        """Gradient accumulation: a measured step's K micro-batches (K backward calls before the
        optimizer step) were each resolved on their own, and PCGrad's projection (or scale's damping)
        is not linear, so their sum differs from what one batch of the same samples gets whenever the
        terms conflict. Resolve the per-term gradients summed over the micro-batches once and put that
        in .grad in place of the per-micro-batch resolutions (what else a loop added stays).
        Data-parallel (`mean_over_ranks`; the measured backward put the plain sum into .grad, averaged
        since): the same for the ranks' batches, with one all-reduce of the per-term gradients, so the step
        takes the global batch's update on every rank, not the average of each rank's own projection.
        Returns whether .grad changed; one micro-batch in one process changes nothing, nor does `none`
        (a plain sum), whose conflict statistics are then the batch's too (each rank's own under torchrun).
        The step's stats (the object the last backward returned) then describe the update the step takes.
        `unit`: what .grad holds per unit of the held gradients (1 / the loss scale where a loop unscaled
        .grad before settling; session/loss_scale.py)."""
        held, self._held = self._held, None
        if held is None or held.step != step:
            return False
        if self.config.strategy == "none":  # the plain sum is linear: .grad is the batch's already, not its stats
            if held.micro_batches > 1:
                held.stats.__dict__.update(self._resolve(held.names, held.stacked, step)[1].__dict__)
            return False
        if held.micro_batches < 2 and self.mean_over_ranks is None:
            return False
        stacked, applied = held.stacked, held.applied
        if self.mean_over_ranks is not None:  # .grad holds the ranks' average of the plain sums: the averaged rows' sum
            stacked = self.mean_over_ranks(stacked)
            applied = {g: rows.sum(0) for g, rows in stacked.items()}
        self._warn_changed_since_backward(held, unit)
        resolved, stats = self._resolve(held.names, stacked, step)
        delta = {g: resolved[g] - applied[g] for g in resolved}
        self._assign(delta if unit == 1.0 else {g: d * unit for g, d in delta.items()})
        held.stats.__dict__.update(stats.__dict__)
        return True

    def _warn_changed_since_backward(self, held: _HeldStep, unit: float) -> None:
        """Settling adds the batch's resolution less what each micro-batch's own put into .grad; a loop that clipped
        .grad in between (without settle_gradients first) got an update that was neither the clipped nor the
        resolved one (3.6e-4 off in a probe), without a word. Said once a run."""
        recorded = getattr(held, "after_backward", None)
        if recorded is None or self.said_changed:
            return
        now, expected = held.grad_square(), recorded * unit * unit
        if abs(now - expected) > 1e-6 * max(expected, 1e-30):
            import warnings

            self.said_changed = True
            warnings.warn(f"step {held.step}: the gradients changed between the last session.backward() and "
                          "before_step (clipping them, as clip_grad_norm_ does?): with gradient accumulation or "
                          "torchrun the step's micro-batches are resolved together when it settles, so call "
                          "session.settle_gradients() before changing the gradients (docs/your-model.md); this "
                          "step's update mixes the changed gradients with the resolution", RuntimeWarning, stacklevel=5)

    def _hold(self, step: int, names: list[str], stacked: dict, resolved: dict, stats: CoordinationStats) -> None:
        """Keep a measured backward's per-term gradients until the optimizer step (settle): summed with
        the step's earlier micro-batches, or the first of a new step (another step number, a new name
        set, or, seen by backward, gradients zeroed since: a step dropped and tried again at its number)."""
        held = self._held
        if held is None or held.step != step or held.names != names:
            self._held = _HeldStep(step, names, stacked, dict(resolved), stats, self.groups)
            return
        for g in stacked:
            held.stacked[g] += stacked[g]
            held.applied[g] = held.applied[g] + resolved[g]  # not in place: .grad may view the first one
        held.stats, held.micro_batches = stats, held.micro_batches + 1

    # -- pieces ---------------------------------------------------------------------------
    def _resolve(self, names: list[str], stacked: dict[str, torch.Tensor], step: int):
        """The coordinated gradient of each group from its terms' gradients (one row per term), and
        the step's conflict statistics."""
        stats = CoordinationStats(step=step, conflict_rate=0.0)
        detailed = step % self.config.log_every == 0  # elementwise sign statistics only when logged
        resolved: dict[str, torch.Tensor] = {}
        conflicts = pairs = 0
        sq_changed = sq_sum = 0.0
        for gname, rows in stacked.items():
            gram = (rows @ rows.T).double()
            norms = gram.diag().clamp_min(0).sqrt()
            # terms that touch this group: a gradient under 1e-5 of the largest one's norm is float noise (the
            # distillation term at step 0, where the student is the teacher), whose random sign read as conflict
            live = [i for i, on in enumerate(norms.gt(1e-5 * float(norms.max())).tolist()) if on]
            # every pair's cosine in one division (element for element the same doubles), read once
            cosines = (gram / (norms.unsqueeze(1) * norms.unsqueeze(0))).tolist() if len(live) > 1 else None
            for ai, a in enumerate(live):
                for b in live[ai + 1 :]:
                    key = f"{names[a]}|{names[b]}@{gname}"
                    c = cosines[a][b]
                    pairs += 1
                    conflicts += c < 0
                    stats.cosines[key] = c
                    if detailed:
                        stats.opposite[key] = opposite_fraction(rows[a], rows[b])
            weights = self._weights(names, gram, gname, stats)
            delta = weights - 1
            resolved[gname] = (weights.to(rows.dtype) @ rows)
            sq_changed += float(delta @ gram @ delta)
            sq_sum += float(gram.sum())
        stats.conflict_rate = conflicts / pairs if pairs else 0.0
        stats.changed = (max(sq_changed, 0.0) / sq_sum) ** 0.5 if sq_sum > 0 else 0.0
        return resolved, stats

    def _objectives(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The terms the strategy resolves: as given, or with `accuracy_as_one` the primary terms
        summed into "accuracy" (first, in the order given) beside the others. `none` changes no
        update, so it keeps every term apart: its statistics then say which terms conflict."""
        primary = [t for n, t in terms.items() if n in PRIMARY]
        if self.config.strategy == "none" or not self.config.accuracy_as_one or len(primary) < 2:
            return terms
        objectives = {"accuracy": functools.reduce(operator.add, primary)}
        objectives.update((n, t) for n, t in terms.items() if n not in PRIMARY)
        return objectives

    def _plain_backward(self, terms: dict[str, torch.Tensor]) -> None:
        if self.config.strategy == "scale" and self.factors:
            # reuse the last measured damping, per term (a group-free approximation between measurements)
            total = sum(t * min(self.factors.get(f"{n}@{g}", 1.0) for g in self.groups) for n, t in terms.items())
        else:  # summed from the first term on: sum() would start at 0 and add one more node to the graph
            total = functools.reduce(operator.add, terms.values())
        if total.requires_grad:
            total.backward()

    def _grad(self, term: torch.Tensor) -> list[torch.Tensor]:
        if not term.requires_grad:  # e.g. a regularizer whose parameters are all frozen
            return [torch.zeros_like(p) for p in self.params]
        try:
            grads = torch.autograd.grad(term, self.params, retain_graph=True, allow_unused=True)
        except RuntimeError as exc:
            if "use_reentrant=True" in str(exc):
                raise JointCompressError(REENTRANT_CHECKPOINT) from exc
            if "donated buffer" not in str(exc):
                raise
            raise JointCompressError(
                "coordination: a measured step takes one gradient per loss term (a backward that keeps the "
                "graph), which a torch.compile'd model refuses when its backward donates buffers. Set "
                "`torch._functorch.config.donated_buffer = False` before the model's first compiled call (it "
                "only saves memory), or train the model uncompiled") from exc
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    def _split(self, per_term: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """group -> the terms' flattened gradients over the group's parameters, one row per term
        (in per_term's order), each written straight into its row."""
        out, offset = {}, 0
        for gname, params in self.groups.items():
            n = len(params)
            size = sum(p.numel() for p in params)
            first = next(iter(per_term.values()))[offset]
            stacked = torch.empty((len(per_term), size), dtype=first.dtype, device=first.device)
            for row, gs in zip(stacked, per_term.values()):
                torch.cat([g.reshape(-1) for g in gs[offset : offset + n]], out=row)
            out[gname] = stacked
            offset += n
        return out

    def _weights(self, names: list[str], gram: torch.Tensor, gname: str, stats: CoordinationStats) -> torch.Tensor:
        """Per-term weights w so that the coordinated gradient of this group is w @ G_flat."""
        k = len(names)
        if self.config.strategy == "pcgrad":
            return pcgrad_weights(gram, self.rng).sum(0)
        weights = torch.ones(k, dtype=gram.dtype, device=gram.device)
        if self.config.strategy == "scale":
            prim = torch.tensor([n in PRIMARY for n in names], dtype=gram.dtype, device=gram.device)
            if prim.sum() == 0:
                prim[0] = 1
            p_norm = float(prim @ gram @ prim) ** 0.5
            for i, n in enumerate(names):
                f = 1.0
                norm_i = float(gram[i, i]) ** 0.5
                if n not in PRIMARY and p_norm > 0 and norm_i > 0 and float(gram[i] @ prim) / (norm_i * p_norm) < -self.config.threshold:
                    f = self.config.factor
                    stats.damped[f"{n}@{gname}"] = f
                self.factors[f"{n}@{gname}"] = f
                weights[i] = f
        return weights

    def _assign(self, resolved: dict[str, torch.Tensor]) -> None:
        for gname, params in self.groups.items():
            vec, offset = resolved[gname], 0
            for p in params:
                g = vec[offset : offset + p.numel()].view_as(p)
                p.grad = g if p.grad is None else p.grad + g  # `resolved` is this step's own: no copy
                offset += p.numel()

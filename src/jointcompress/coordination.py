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
last factors and the others take the plain sum with a single backward.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

PRIMARY = ("task", "distill")


def pcgrad(grads: list[torch.Tensor], rng: random.Random | None = None) -> list[torch.Tensor]:
    """Project each gradient away from the others it conflicts with; returns new tensors."""
    rng = rng or random.Random(0)
    out = []
    for i, g in enumerate(grads):
        g = g.clone()
        others = [j for j in range(len(grads)) if j != i]
        rng.shuffle(others)
        for j in others:
            h = grads[j]
            dot = torch.dot(g, h)
            if dot < 0:
                g = g - dot / h.dot(h).clamp_min(1e-20) * h
        out.append(g)
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    return float(a.dot(b) / (na * nb))


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
    opposite: dict[str, float] = field(default_factory=dict)  # "a|b@group" -> opposite-sign fraction
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


class GradientCoordinator:
    def __init__(self, config, groups: dict[str, list[torch.nn.Parameter]], seed: int = 0):
        self.config = config
        self.groups = {k: [p for p in v if p.requires_grad] for k, v in groups.items()}
        self.groups = {k: v for k, v in self.groups.items() if v}
        self.params = [p for v in self.groups.values() for p in v]
        self.factors: dict[str, float] = {}  # "term@group" -> last scale factor
        self.rng = random.Random(seed)

    def backward(self, terms: dict[str, torch.Tensor], step: int) -> CoordinationStats | None:
        """Put the coordinated gradient into .grad of every shared parameter."""
        measured = step % self.config.every == 0 and len(terms) > 1
        if not measured:
            self._plain_backward(terms)
            return None
        per_term = {name: self._grad(t) for name, t in terms.items()}
        stats = CoordinationStats(step=step, conflict_rate=0.0)
        resolved: dict[str, torch.Tensor] = {}
        conflicts = pairs = 0
        sq_changed = sq_sum = 0.0
        for gname, flat in self._split(per_term).items():
            names = [n for n in flat if flat[n].any()]  # terms that touch this group at all
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    key = f"{names[a]}|{names[b]}@{gname}"
                    c = cosine(flat[names[a]], flat[names[b]])
                    pairs += 1
                    conflicts += c < 0
                    stats.cosines[key] = c
                    stats.opposite[key] = opposite_fraction(flat[names[a]], flat[names[b]])
            plain = torch.stack(list(flat.values())).sum(0)
            combined = self._resolve(flat, gname, stats)
            resolved[gname] = combined
            sq_changed += float((combined - plain).pow(2).sum())
            sq_sum += float(plain.pow(2).sum())
        stats.conflict_rate = conflicts / pairs if pairs else 0.0
        stats.changed = (sq_changed / sq_sum) ** 0.5 if sq_sum > 0 else 0.0
        self._assign(resolved)
        return stats

    # -- pieces ---------------------------------------------------------------------------
    def _plain_backward(self, terms: dict[str, torch.Tensor]) -> None:
        if self.config.strategy == "scale" and self.factors:
            # reuse the last measured damping, per term (a group-free approximation between measurements)
            total = sum(t * min(self.factors.get(f"{n}@{g}", 1.0) for g in self.groups) for n, t in terms.items())
        else:
            total = sum(terms.values())
        if total.requires_grad:
            total.backward()

    def _grad(self, term: torch.Tensor) -> list[torch.Tensor]:
        if not term.requires_grad:  # e.g. a regularizer whose parameters are all frozen
            return [torch.zeros_like(p) for p in self.params]
        grads = torch.autograd.grad(term, self.params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    def _split(self, per_term: dict[str, list[torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """group -> term -> flattened gradient over the group's parameters."""
        out, offset = {}, 0
        for gname, params in self.groups.items():
            n = len(params)
            out[gname] = {t: torch.cat([g.flatten() for g in gs[offset : offset + n]]) for t, gs in per_term.items()}
            offset += n
        return out

    def _resolve(self, flat: dict[str, torch.Tensor], gname: str, stats: CoordinationStats) -> torch.Tensor:
        strategy = self.config.strategy
        if strategy == "pcgrad":
            return torch.stack(pcgrad(list(flat.values()), self.rng)).sum(0)
        if strategy == "scale":
            primary = [flat[n] for n in flat if n in PRIMARY] or [next(iter(flat.values()))]
            p = torch.stack(primary).sum(0)
            total = torch.zeros_like(p)
            for n, g in flat.items():
                f = 1.0
                if n not in PRIMARY and cosine(g, p) < -self.config.threshold:
                    f = self.config.factor
                    stats.damped[f"{n}@{gname}"] = f
                self.factors[f"{n}@{gname}"] = f
                total = total + f * g
            return total
        return torch.stack(list(flat.values())).sum(0)

    def _assign(self, resolved: dict[str, torch.Tensor]) -> None:
        for gname, params in self.groups.items():
            vec, offset = resolved[gname], 0
            for p in params:
                g = vec[offset : offset + p.numel()].view_as(p)
                p.grad = g.clone() if p.grad is None else p.grad + g
                offset += p.numel()

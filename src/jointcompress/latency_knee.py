"""When a latency target is out of reach, do not pay accuracy for speed the table says is not there.

Why: a target under what the narrowest allowed model runs at cannot be met, and the allocator
(latency_targets.greedy_widths) then cuts every group to its floor. The last of those cuts can
buy almost no time at a very high price. The small ResNet on MNIST at a 5x target
(benchmarks/results/against_torch_pruning_resnet_60k_x5.json, 1 epoch): every group at 8
channels measured 12.0-12.1 ms in ONNX Runtime (batch 64, alone; Torch-Pruning's stages 7-8), and 16
channels kept in the last block's two groups 12.3 ms (stage 6), 2% slower; yet after the same budget
the first reached 74.8% test accuracy (ours) or 58.8% on the selection images (Torch-Pruning)
and the second 94.3% (Torch-Pruning). With this give-back the same run reached 95.8%
(..._x5_v3.json).

So, from the widths the allocator reached, channels are given back where the table says they
cost the fewest milliseconds per importance regained (width_importance), while the predicted
latency stays within `tolerance` of the narrow model's: a model about as fast as the floor that
keeps what the last cuts would have thrown away (the allocation's `met` still says whether it
measured under the target).

What the table cannot see is not given back: a step the table says costs nothing (a flat
stretch of a table timed under load) stays cut, and a table that cannot tell the full model
from the narrow one (every layer timed flat) gets no give-back at all; the runtime judges those
(latency_targets.narrow).
"""
from __future__ import annotations

TOLERANCE = 0.05  # at most 5% slower than the narrow model: less than repeated timings of one model
# differ by on a shared machine (the ResNet's floor: 24.0 ms in the allocation, 12.1 ms alone, ..._x5.json)


def give_back_within(table, sites, channels: dict[str, int], importance, widths: dict[str, int],
                     options: dict[str, list[int]], tolerance: float = TOLERANCE) -> tuple[dict[str, int], float]:
    """Widths at most `tolerance` slower (predicted) than `widths`, with the most importance
    regained: one kernel step wider at a time, the step with the most importance regained per
    predicted millisecond added first. `options[group]`: its allowed widths, ascending.
    Returns (widths, predicted ms); `widths` unchanged when the table cannot resolve the cut."""
    base = table.predict(sites, widths, channels)
    cap = base * (1.0 + tolerance)
    if tolerance <= 0 or table.predict(sites, channels, channels) <= base * (1.0 + 2 * tolerance):
        return dict(widths), base  # the table barely tells the full model from this one: not trusted
    current, predicted = dict(widths), base
    while True:
        best = None
        for g, ws in options.items():
            wider = [w for w in ws if w > current[g]]
            if not wider:
                continue
            trial = {**current, g: wider[0]}
            ms = table.predict(sites, trial, channels)
            added = ms - predicted
            regained = importance.lost(g, wider[0], current[g])
            if ms > cap or added <= 0 or regained <= 0:
                continue  # over the cap, unseen by the table, or worth nothing
            if best is None or regained / added > best[0]:
                best = (regained / added, trial, ms)
        if best is None:
            return current, predicted
        _, current, predicted = best

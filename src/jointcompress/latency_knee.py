"""When a latency target is out of reach, do not pay accuracy for speed the table says is not there.

Why: a target under what the narrowest allowed model runs at cannot be met, and the allocator
(latency_targets.greedy_widths) then cuts every group to its floor. The last of those cuts can
buy almost no time at a very high price. On the small ResNet / MNIST at a 5x target (60k
images, 1 epoch, benchmarks/against_torch_pruning.py), every group at 8 channels measured
12.08 ms in ONNX Runtime and reached 74.8% test accuracy after the joint run; the same widths
with the last block's 16 channels kept measured 12.29 ms (+1.7%) and reached 93.9% after the
same run. Torch-Pruning's stages show the same cliff between those two width sets (selection
accuracy 58.8% vs 92.5% after the full budget).

So, from the widths the allocator reached, channels are given back where the table says they
cost the fewest milliseconds per importance regained (width_importance), while the predicted
latency stays within `tolerance` of the narrow model's. The result still misses the target (the
allocation's `met` says so); it is a model about as fast as the floor that keeps what the last
cuts would have thrown away.

What the table cannot see is not given back: a step the table says costs nothing (a flat
stretch of a table timed under load) stays cut, and a table that cannot tell the full model
from the narrow one (every layer timed flat) gets no give-back at all; the runtime judges those
(latency_targets.narrow).
"""
from __future__ import annotations

TOLERANCE = 0.05  # at most 5% slower than the narrow model: less than repeated timings of one model
# on a shared machine differ by (the ResNet's floor measured 12.1 and 24.0 ms in two confirmations)


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

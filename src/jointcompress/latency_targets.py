"""From `target: {latency_ms, batch}` (or `{speedup, batch}`, times faster than the uncompressed
model timed when the run starts) to a width for every channel group, from measured tables.

Why per group, and why tables: one uniform channel sparsity spends the latency budget badly.
Layers differ in cost per channel (a 5x5 conv on 24x24 maps costs far more per channel than a
Linear) and in how much a channel matters. So the model's latency is predicted from a
**per-layer latency table**: each convolution / Linear is timed alone on its real input size, at a
grid of (input width, output width) pairs, for the runtime and batch the target names, and
interpolated in between; the rest of the model (pooling, BatchNorm, Python) is one measured
constant. The allocator then removes channels greedily, a kernel-friendly step at a time
(multiples of 8 or 16 where a group is wide enough), always where the predicted milliseconds
saved per unit of importance lost (width_importance: channel L2 norms relative to their group's
mean, or the measured rise of a held-out loss when the group is cut) is largest,
until the prediction is at or under the target. The shrunk model is then timed (deploy.timing)
to confirm; if it measures over, the prediction was optimistic by measured/predicted and the
allocation is redone against a target lowered by that factor (a few times at most). Still over
(a table that reads optimistic), the narrowest model allowed is timed: over the target too, the
target is refused (TargetError) before any training; else `narrow` cuts, measured, until it is
under. Only the groups prune_structured may prune (its targets / exclude) are allocated.
Where the table cannot tell cuts apart any more (flat, or timed under load), the cut goes on
towards every group's floor instead of stopping; `narrow` then cuts further on the deployment
runtime itself while the model measures over, and the allocation records whether the target was
met (`met`), so a run that cannot reach it says so. A target out of the table's reach does not
buy the last percent of speed at any price: the channels whose cut saves under a tolerance are
given back where they matter most (latency_knee), and `narrow` leaves them.

Tests use a fake table (no timing in tests); benchmarks/latency_target.py runs it for real.
"""
from __future__ import annotations

import bisect
import copy
import logging
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .batch_memory import check_batch_fits
from .bench import batch_of
from .block_drop import allocation_base
from .deploy.timing import DEFAULT_THREADS, steady_ms, time_contenders
from .graph import PRUNABLE_ROOTS, ChannelGroup, build_graph, discover_groups
from .latency_knee import TOLERANCE, give_back_within
from .layer_types import CONVOLUTIONS
from .model_call import call_model, forward_hooks, to_device
from .model_copy import on_cpu

# progress of the timing before a latency target's first step (minutes on a large model, said on no line before):
# INFO records, which the command line prints and a library user sees where logging is configured to show them
log = logging.getLogger("jointcompress.latency")

MAX_CONFIRM = 3  # allocate -> time -> tighten rounds
CALIBRATED = 0.85  # calibrate=True stops once a model measures within 15% under the target
MIN_KEEP = 0.05  # every group keeps at least this share of its channels (and one kernel step)
MIN_WIDTH = 8  # ... and at least this many channels
GRID_POINTS = 5  # widths timed per axis of a layer table
REPEATS = 3  # a confirming measurement is the least of this many medians
NARROW_TRIALS = 30  # measured cuts (at least; 4 per group) when a table's allocation still measures over
BISECT_STEPS = 4  # measured goals between one that measured over and one far under (compress's path)
WIDEN_TRIALS = 12  # measured give-backs after them (at least; 2 per group)
# compress accepts an allocation only at or under (1 - ACCEPT_MARGIN) x the target: its probes are the
# least of REPEATS medians timed alone, the run's verdict the median interleaved with the uncompressed
# model, which read 3-4% slower in quiet runs (docs/latency.md, "what the target means")
ACCEPT_MARGIN = 0.05
TIMING_SLACK = 1.25  # before training, a target is refused only where the narrowest model measures this much over it


def kernel_multiple(channels: int) -> int:
    """The channel step kernels like: 16 for wide groups, 8 for medium, 4 / 1 for narrow ones."""
    if channels >= 128:
        return 16
    if channels >= 32:
        return 8
    return 4 if channels >= 12 else 1


def allowed_widths(channels: int, min_keep: float = MIN_KEEP, min_width: int = MIN_WIDTH) -> list[int]:
    """Widths a group may take: multiples of its kernel step (and the full width), ascending."""
    step = kernel_multiple(channels)
    # at least MIN_WIDTH channels: the thin early layers cost little and carry every feature
    # (LeNet-5 / ResNet on MNIST cut to 4 stem channels lost 0.5-10 points, against_torch_pruning.py)
    floor = max(step, min(channels, min_width), int(-(-channels * min_keep // 1)))
    widths = sorted({w for w in range(step, channels, step) if w >= floor} | {channels})
    return widths


# -- the model as layers fed by groups ---------------------------------------------------

@dataclass
class LayerSite:
    """A convolution / Linear: its full widths, which group sets each, and its input shape."""

    name: str
    cin: int
    cout: int
    # every group feeding the input -> how many of its `cin` input channels / features it feeds
    # (several for a torch.cat of groups; a flatten counts each channel once per position)
    in_groups: dict[str, int]
    out_group: str | None
    input_shape: tuple  # one sample, as seen in the forward pass
    spec: dict = field(default_factory=dict)  # what it takes to rebuild the layer at other widths
    out_elems: int = 0  # output elements of one sample at full width (what BN, ReLU, pooling touch)

    @property
    def in_group(self) -> str | None:
        """The one group feeding the input (the first, when a concatenation joins several)."""
        return next(iter(self.in_groups), None)


def layer_sites(model: nn.Module, example_inputs, groups: list[ChannelGroup]) -> dict[str, LayerSite]:
    """Every prunable layer with the group setting its output and the group feeding its input."""
    shapes, outs = {}, {}

    def record(mod, inp, out, n):
        shapes[n], outs[n] = tuple(inp[0].shape[1:]), out[0].numel()

    hooked = [(m, lambda mod, inp, out, n=n: record(mod, inp, out, n))
              for n, m in model.named_modules() if isinstance(m, PRUNABLE_ROOTS)]
    with forward_hooks(hooked), torch.no_grad():
        call_model(model.eval(), batch_of(example_inputs, 1))
    out_of, in_of = {}, {}
    for g in groups:
        for mem in g.members:
            if mem.kind == "out":
                out_of[mem.module] = g.name
            else:  # a layer fed by torch.cat of several groups is an "in" member of each, at its own slice
                shares = in_of.setdefault(mem.module, {})
                shares[g.name] = shares.get(g.name, 0) + len(mem.idxs)
    sites = {}
    for name, m in model.named_modules():
        if not isinstance(m, PRUNABLE_ROOTS) or name not in shapes:
            continue
        conv = isinstance(m, CONVOLUTIONS)
        spec = ({"type": type(m), "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "bias": m.bias is not None}
                if conv else {"bias": m.bias is not None})
        if conv and m.groups != 1:
            continue  # grouped / depthwise convs: not tabled (their cost rides in the constant)
        sites[name] = LayerSite(name, m.in_channels if conv else m.in_features, m.out_channels if conv else m.out_features,
                                in_of.get(name, {}), out_of.get(name), shapes[name], spec, outs[name])
    return sites


def site_widths(site: LayerSite, widths: dict[str, int], channels: dict[str, int]) -> tuple[int, int]:
    """(input width, output width) of a layer when its groups have `widths` channels.

    The input width is what no group feeds plus each feeding group's share scaled by its kept
    width: a Linear after a flatten sees each channel of its group several times (spatial
    positions), so its share scales as share * w / channels; a layer fed by torch.cat of
    several groups sums them.
    """
    return input_width(site, widths, channels), (site.cout if site.out_group is None else widths[site.out_group])


def input_width(site: LayerSite, widths: dict[str, int], channels: dict[str, int]) -> int:
    """The layer's input width when its feeding groups keep `widths` (site_widths)."""
    if not site.in_groups:
        return site.cin
    fixed = site.cin - sum(site.in_groups.values())
    return max(1, round(fixed + sum(share * widths[g] / channels[g] for g, share in site.in_groups.items())))


# -- latency tables ----------------------------------------------------------------------

@dataclass
class LatencyTable:
    """Measured milliseconds of each layer at a grid of (input width, output width), plus a constant.

    `layers[name] = {"cin": [...], "cout": [...], "ms": [[ms at cin[i], cout[j]]]}`; between
    grid points the table is interpolated bilinearly (cost grows ~ cin * cout). What the
    layers alone miss (BatchNorm, ReLU, pooling, residual adds, framework overhead) is
    `constant_ms` plus `activation_ms` per million output elements of the tabled layers, which
    shrink with the widths. The context (runtime, precision, batch, threads) says what the
    numbers are valid for.
    """

    layers: dict[str, dict]
    constant_ms: float = 0.0
    activation_ms: float = 0.0  # per 1e6 output elements (of one sample) of the tabled layers
    runtime: str = "torch"
    precision: str = "fp32"
    batch: int = 1
    threads: int = DEFAULT_THREADS

    def layer_ms(self, name: str, cin: int, cout: int) -> float:
        t = self.layers[name]
        (i0, i1, a), (j0, j1, b) = _bracket(t["cin"], cin), _bracket(t["cout"], cout)
        ms = t["ms"]
        return ((1 - a) * (1 - b) * ms[i0][j0] + a * (1 - b) * ms[i1][j0]
                + (1 - a) * b * ms[i0][j1] + a * b * ms[i1][j1])

    def predict(self, sites: dict[str, LayerSite], widths: dict[str, int], channels: dict[str, int]) -> float:
        total = self.constant_ms + self.activation_ms * activations(sites, widths, channels) / 1e6
        for name, site in sites.items():
            if name in self.layers:
                total += self.layer_ms(name, *site_widths(site, widths, channels))
        return total

    def to_dict(self) -> dict:
        return {"layers": self.layers, "constant_ms": self.constant_ms, "activation_ms": self.activation_ms, "runtime": self.runtime,
                "precision": self.precision, "batch": self.batch, "threads": self.threads}


def activations(sites: dict[str, LayerSite], widths: dict[str, int], channels: dict[str, int]) -> float:
    """Output elements of one sample over the layers, at `widths`."""
    return sum(s.out_elems * (widths[s.out_group] / channels[s.out_group] if s.out_group else 1.0) for s in sites.values())


def _bracket(grid: list[int], v: float) -> tuple[int, int, float]:
    """Indices around v in an ascending grid and the weight of the upper one (linear, clamped)."""
    if len(grid) == 1 or v <= grid[0]:
        return 0, 0, 0.0
    if v >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    k = bisect.bisect_right(grid, v)
    lo, hi = grid[k - 1], grid[k]
    return k - 1, k, (v - lo) / (hi - lo)


def grid_of(full: int, grouped: bool) -> list[int]:
    """The widths a layer axis is timed at: a few allowed widths spread from smallest to full."""
    if not grouped:
        return [full]
    ws = allowed_widths(full)
    if len(ws) <= GRID_POINTS:
        return ws
    picks = {ws[round(i * (len(ws) - 1) / (GRID_POINTS - 1))] for i in range(GRID_POINTS)}
    return sorted(picks)


def input_grid(site: LayerSite, channels: dict[str, int]) -> list[int]:
    """The input widths a layer is timed at: its one feeding group's grid scaled to the layer's
    input, or, fed by a concatenation of groups, GRID_POINTS widths spread evenly from every
    group at its floor to full width."""
    if not site.in_groups:
        return [site.cin]
    if len(site.in_groups) == 1:
        g = site.in_group
        return sorted({input_width(site, {g: w}, channels) for w in grid_of(channels[g], True)})
    low = input_width(site, {g: allowed_widths(channels[g])[0] for g in site.in_groups}, channels)
    return sorted({round(low + (site.cin - low) * i / (GRID_POINTS - 1)) for i in range(GRID_POINTS)})


def _rebuilt(site: LayerSite, cin: int, cout: int) -> tuple[nn.Module, tuple]:
    if "kernel_size" in site.spec:
        layer = site.spec["type"](cin, cout, site.spec["kernel_size"], site.spec["stride"], site.spec["padding"], bias=site.spec["bias"])
        shape = (cin, *site.input_shape[1:])
    else:
        layer = nn.Linear(cin, cout, bias=site.spec["bias"])
        shape = (cin,)
    return layer.eval(), shape


def measure_table(model: nn.Module, example_inputs, batch: int, threads: int = DEFAULT_THREADS,
                  rounds: int = 15, groups: list[ChannelGroup] | None = None) -> LatencyTable:
    """Time every prunable layer alone at a grid of widths in PyTorch fp32 (deploy.timing),
    and the rest of the model as the full model's time minus its layers' at full width."""
    groups = groups if groups is not None else discover_groups(model, example_inputs)[0]
    channels = {g.name: g.channels for g in groups}
    sites = layer_sites(model, example_inputs, groups)
    layers, began = {}, time.perf_counter()
    for done, (name, site) in enumerate(sites.items()):
        if done:
            elapsed = time.perf_counter() - began
            log.info("latency table: %d of %d layers timed at batch %d (%.0f s, about %.0f s to go)", done, len(sites),
                     batch, elapsed, elapsed / done * (len(sites) - done))
        cins = input_grid(site, channels)
        couts = grid_of(site.cout, site.out_group is not None)
        fns = {}
        for ci in cins:
            for co in couts:
                layer, shape = _rebuilt(site, ci, co)
                x = torch.randn(batch, *shape)
                fns[(ci, co)] = lambda layer=layer, x=x: layer(x)
        t = time_contenders(fns, threads=threads, rounds=rounds, warmup=2, alone_runs=3)
        layers[name] = {"cin": cins, "cout": couts, "ms": [[t.interleaved_ms[(ci, co)] for co in couts] for ci in cins]}
    table = LatencyTable(layers, 0.0, 0.0, "torch", "fp32", batch, threads)
    log.info("latency table: %d layers timed (%.0f s); timing the rest of the model, then the allocation's candidates",
             len(sites), time.perf_counter() - began)
    fit_rest(table, model, example_inputs, sites, channels, rounds)
    return table


def fit_rest(table: LatencyTable, model: nn.Module, example_inputs, sites, channels, rounds: int) -> None:
    """Fit the constant and the per-activation cost from the full model and a half-width copy,
    timed together: measured - tabled layers = constant + activation_ms * elements."""
    half = {g: allowed_widths(c)[len(allowed_widths(c)) // 2] for g, c in channels.items()}
    models = {"full": (model.eval(), channels), "half": (shrunk_to(model, example_inputs, half), half)}
    x = batch_of(example_inputs, table.batch)
    t = time_contenders({k: (lambda m=m: call_model(m, x)) for k, (m, _) in models.items()}, threads=table.threads,
                        rounds=rounds, warmup=2, alone_runs=3)
    rest = {k: t.interleaved_ms[k] - table.predict(sites, w, channels) for k, (_, w) in models.items()}
    elems = {k: activations(sites, w, channels) / 1e6 for k, (_, w) in models.items()}
    slope = (rest["full"] - rest["half"]) / (elems["full"] - elems["half"]) if elems["full"] > elems["half"] else 0.0
    table.activation_ms = max(0.0, slope)
    table.constant_ms = max(0.0, rest["full"] - table.activation_ms * elems["full"])


# -- the allocator -----------------------------------------------------------------------

@dataclass
class LatencyAllocation:
    """Channels kept per group, what the table predicts for them and what was measured."""

    widths: dict[str, int]
    channels: dict[str, int]
    predicted_ms: float
    target_ms: float
    measured_ms: float | None = None
    rounds: list[dict] = field(default_factory=list)  # every allocate -> time round
    importance: dict | None = None  # what the cuts were ranked by (width_importance .to_dict()), when recorded
    least: dict[str, int] | None = None  # out of reach: narrower than these buys < tolerance (latency_knee)

    @property
    def met(self) -> bool | None:
        """Whether the shrunk model measured at or under the target (None: not measured)."""
        return None if self.measured_ms is None else self.measured_ms <= self.target_ms

    @property
    def layer_sparsity(self) -> dict[str, float]:
        return {g: 1.0 - self.widths[g] / self.channels[g] for g in self.widths}

    @property
    def overall_sparsity(self) -> float:
        return 1.0 - sum(self.widths.values()) / max(1, sum(self.channels.values()))

    def to_dict(self) -> dict:
        return {"widths": self.widths, "channels": self.channels, "predicted_ms": self.predicted_ms,
                "target_ms": self.target_ms, "measured_ms": self.measured_ms, "met": self.met, "rounds": self.rounds,
                "layer_sparsity": self.layer_sparsity, "importance": self.importance, "least": self.least}


def relative_importance(model: nn.Module, groups: list[ChannelGroup]):
    """Channel L2 norms of each group over its mean (width_importance.NormImportance): the
    default currency when no held-out data is given."""
    from .width_importance import norm_importance

    return norm_importance(model, groups)


def greedy_widths(table: LatencyTable, sites: dict[str, LayerSite], channels: dict[str, int],
                  importance, target_ms: float, min_keep: float = MIN_KEEP,
                  min_width: int = MIN_WIDTH) -> tuple[dict[str, int], float]:
    """Remove channels a kernel step at a time where predicted ms saved per importance lost is
    best, until the predicted latency is <= target_ms. `importance.lost(group, wide, narrow)`
    says what a cut loses (width_importance). A measured table is noisy: where a group's next
    step saves nothing, the cut jumps to the first narrower width that does (else one flat
    step would stop the group, and the allocation, short of the target). Where no group's cut
    saves anything any more (a flat table, or one timed under load) and the prediction is still
    over the target, the table cannot tell the cuts apart: the least important step is taken,
    towards every group's floor, instead of stopping (a table that reads flat under load left
    the ResNet's widest layers at full width, 44 ms measured for a 2.7 ms target); the runtime
    then judges the result (allocate_latency). Returns (widths, predicted ms)."""
    widths = dict(channels)
    options = {g: allowed_widths(c, min_keep, min_width) for g, c in channels.items()}
    predicted = table.predict(sites, widths, channels)
    while predicted > target_ms:
        trial = _best_saving(table, sites, channels, importance, widths, options, predicted) \
            or _least_important_step(importance, widths, options)
        if trial is None:
            break  # every group at its floor
        widths = trial
        predicted = table.predict(sites, widths, channels)
    return widths, predicted


def _best_saving(table: LatencyTable, sites, channels, importance, widths: dict[str, int], options: dict,
                 predicted: float) -> dict[str, int] | None:
    """The cut with the most predicted ms saved per importance lost (None: no cut saves)."""
    best = None
    for g, ws in options.items():
        for narrow in reversed(ws[:ws.index(widths[g])]):  # the next step first
            trial = {**widths, g: narrow}
            saved = predicted - table.predict(sites, trial, channels)
            if saved > 0:
                score = saved / max(importance.lost(g, widths[g], narrow), 1e-9)
                if best is None or score > best[0]:
                    best = (score, trial)
                break
    return best[1] if best else None


def _least_important_step(importance, widths: dict[str, int], options: dict) -> dict[str, int] | None:
    """One kernel step down for the group that loses least per channel removed (None: all at floor)."""
    best = None
    for g, ws in options.items():
        k = ws.index(widths[g])
        if k == 0:
            continue
        narrow = ws[k - 1]
        cost = importance.lost(g, widths[g], narrow) / (widths[g] - narrow)
        if best is None or cost < best[0]:
            best = (cost, {**widths, g: narrow})
    return best[1] if best else None


def floors(channels: dict[str, int], min_keep: float = MIN_KEEP, min_width: int = MIN_WIDTH) -> dict[str, int]:
    """The narrowest width every group may take."""
    return {g: allowed_widths(c, min_keep, min_width)[0] for g, c in channels.items()}


def allocate_latency(model: nn.Module, example_inputs, target, table: LatencyTable | None = None,
                     measure=None, min_keep: float = MIN_KEEP, threads: int = DEFAULT_THREADS,
                     rounds: int = 30, calibrate: bool = False, max_rounds: int = MAX_CONFIRM,
                     min_width: int = MIN_WIDTH, importance=None,
                     tolerance: float = TOLERANCE, targets=("*",), exclude=(),
                     margin: float = 0.0) -> LatencyAllocation:
    """Per-group widths whose shrunk model meets `target.latency_ms` at `target.batch`.

    `table`: a LatencyTable (default: measured now, PyTorch fp32). `measure(model) -> ms`:
    how the shrunk model is confirmed (default: deploy.timing at target.batch; pass a
    function to confirm on the deployment runtime, or `False` to trust the table). While a
    shrunk model measures over the target, the goal is lowered by predicted / measured and the
    allocation redone. `calibrate=True` (a table from another runtime than `measure`'s) first
    times the unpruned model to convert the target into the table's units, and also raises the goal when a model measures far under the target (< CALIBRATED of it), so that
    the table's relative costs are scaled to the runtime; the widest model that met the target
    is returned. `min_width`: no group below this many channels (default MIN_WIDTH).
    `importance`: what a cut loses (width_importance; default channel norms, data-free).
    A table that cannot reach the goal (flat, or timed under load) still cuts every group
    towards its floor (greedy_widths), and the runtime judges: the result's `met` says whether
    the model measured at or under the target; `narrow` cuts further, measured, when it did not.
    When a goal is out of the table's reach, channels are given back while the prediction stays
    within `tolerance` of the narrowest (latency_knee; 0: off) and the result's `least` records
    those widths, under which `narrow` does not cut.
    `targets` / `exclude`: prune_structured's, so that only the groups the technique will prune
    are cut (discover_groups selects them as the technique does); the others keep their width.
    `margin`: a measurement is accepted only at or under (1 - margin) x the target (resolve_latency:
    ACCEPT_MARGIN; the run's verdict times the model another way); `met` is against the target.
    Not calibrating (the table's runtime is the one measured, compress's path), an allocation that
    still measures over is settled: the narrowest model allowed is measured, the target refused
    (TargetError) when that misses it too, else cut further, measured (`narrow`), down to the floor.
    """
    groups, _ = discover_groups(model, example_inputs, list(targets), list(exclude))
    channels = {g.name: g.channels for g in groups}
    sites = layer_sites(model, example_inputs, groups)
    table = table if table is not None else measure_table(model, example_inputs, target.batch, threads, groups=groups)
    importance = importance if importance is not None else relative_importance(model, groups)
    if measure is None:
        measure = lambda m: timed_ms(m, example_inputs, target.batch, threads, rounds)  # noqa: E731
    aim = float(target.latency_ms) * (1.0 - margin)
    search = _Search(model, example_inputs, target, table, sites, channels, importance, measure, aim, min_keep,
                     min_width, tolerance, calibrate)
    goal = aim
    if calibrate and measure is not False:
        goal = search.calibrate_table(goal)
    result = search.rounds(goal, max_rounds)
    if measure is False or calibrate:
        return result
    if result.measured_ms <= aim:
        return search.given_back(result)
    return settle(model, example_inputs, target, result, search.table, sites, measure, importance, aim, min_keep,
                  min_width)


@dataclass
class _Search:
    """What the rounds of one allocate_latency call share (the model's layers and groups, the table,
    the importance, how a shrunk model is measured) and the log every measurement joins."""

    model: nn.Module
    example_inputs: object
    target: object
    table: LatencyTable
    sites: dict[str, LayerSite]
    channels: dict[str, int]
    importance: object
    measure: object
    aim: float
    min_keep: float
    min_width: int
    tolerance: float
    calibrate: bool
    log: list = field(default_factory=list)
    over_goal: float | None = None  # the narrowest goal whose model measured over the aim
    under_goal: float | None = None  # the goal of the widest model that measured at or under it

    def calibrate_table(self, goal: float) -> float:
        """Start from the runtime's speed relative to the table's: another runtime drops the
        constant (Python, dispatch) and fuses BN into the convs, so the layers' and activations'
        (ReLU, pooling) relative costs are kept and scaled by the unpruned model's measured time.
        Returns the goal in the table's units."""
        t = self.table
        self.table = LatencyTable(t.layers, 0.0, t.activation_ms, t.runtime, t.precision, t.batch, t.threads)
        full_ms = float(self.measure(copy.deepcopy(self.model).eval()))
        predicted = self.table.predict(self.sites, self.channels, self.channels)
        self.log.append({"goal_ms": None, "predicted_ms": predicted, "measured_ms": full_ms,
                         "widths": dict(self.channels)})
        return goal * (predicted / full_ms)  # this grouping: the goals rounded as before the refactor

    def widths_for(self, goal: float, first: bool) -> tuple[dict[str, int], float, dict[str, int] | None, float]:
        """The greedy widths for `goal`: (widths, predicted ms, `least`, goal). On the first round of
        a search that is not calibrating, a goal the table cannot reach is re-read at the measured
        floor (goal_at_the_floor; calibrating, the table's units are not the runtime's: the
        narrowest model is timed by the rounds instead). Still out of reach, the channels the last
        cuts would throw away for under `tolerance` are given back (latency_knee): `least`."""
        widths, predicted = greedy_widths(self.table, self.sites, self.channels, self.importance, goal,
                                          self.min_keep, self.min_width)
        if predicted > goal and not self.calibrate and first:
            goal = goal_at_the_floor(self.model, self.example_inputs, self.target, self.table, self.sites,
                                     self.channels, self.measure, self.min_keep, self.min_width, self.log, self.aim)
            widths, predicted = greedy_widths(self.table, self.sites, self.channels, self.importance, goal,
                                              self.min_keep, self.min_width)
        if predicted <= goal:
            return widths, predicted, None, goal
        options = {g: allowed_widths(c, self.min_keep, self.min_width) for g, c in self.channels.items()}
        widths, predicted = give_back_within(self.table, self.sites, self.channels, self.importance, widths, options,
                                             self.tolerance)
        return widths, predicted, dict(widths), goal

    def rounds(self, goal: float, max_rounds: int) -> LatencyAllocation:
        """Allocate -> measure -> re-aim, at most `max_rounds` times: while a shrunk model measures
        over the aim, the goal is lowered by predicted / measured (the target in table units at
        this operating point); calibrating, it is also raised when a model measures far under
        (< CALIBRATED of the aim). The widest model that met the aim, else the last one (its
        measured_ms over the target tells the caller)."""
        best = last = None
        for _ in range(max_rounds):
            widths, predicted, least, goal = self.widths_for(goal, first=last is None)
            if predicted > goal and last is not None and widths == last.widths:
                break  # a tightened goal the table cannot reach any further: keep what was measured
            last = LatencyAllocation(widths, self.channels, predicted, float(self.target.latency_ms), rounds=self.log,
                                     least=least)
            if self.measure is False:
                self.log.append({"goal_ms": goal, "predicted_ms": predicted, "measured_ms": None})
                return last
            last.measured_ms = float(self.measure(shrunk_to(self.model, self.example_inputs, widths)))
            log.info("latency allocation: widths predicted at %.3f ms measured %.3f ms (aim %.3f ms)", predicted,
                     last.measured_ms, self.aim)
            self.log.append({"goal_ms": goal, "predicted_ms": predicted, "measured_ms": last.measured_ms,
                             "widths": dict(widths), **({"gave_back": True} if least is not None else {})})
            if last.measured_ms <= self.aim:
                if best is None or sum(widths.values()) > sum(best.widths.values()):
                    best, self.under_goal = last, goal
                if not self.calibrate or last.measured_ms >= CALIBRATED * self.aim or widths == self.channels:
                    break
            else:
                self.over_goal = goal if self.over_goal is None else min(self.over_goal, goal)
            goal = self.aim * predicted / last.measured_ms
        return best or last

    def given_back(self, best: LatencyAllocation) -> LatencyAllocation:
        """A model that measured far under the aim (< CALIBRATED of it) gets back what the aim still
        affords, measured. Why: the rounds re-aim by predicted / measured, which is exact only for a
        table proportional to the runtime; a table that reads small layers high (each timed alone) has
        an offset, so the rounds jump between a model over the aim and one far under it (a 1.5x target
        measured 3.8x faster: every group at its floor, accuracy thrown away for speed nobody asked
        for). The goal is bisected between the two (`refined`), then `widen` gives back single steps."""
        best = self.refined(best)
        if best.measured_ms >= CALIBRATED * self.aim or best.widths == self.channels:
            return best
        capped = LatencyAllocation(dict(best.widths), self.channels, best.predicted_ms, self.aim, best.measured_ms,
                                   self.log)
        wide = widen(self.model, self.example_inputs, capped, self.measure,
                     max_trials=max(WIDEN_TRIALS, 2 * len(self.channels)), min_keep=self.min_keep,
                     min_width=self.min_width, importance=self.importance)
        if wide.widths == best.widths:
            return best
        return LatencyAllocation(wide.widths, self.channels, self.table.predict(self.sites, wide.widths, self.channels),
                                 best.target_ms, wide.measured_ms, self.log, best.importance, best.least)

    def refined(self, best: LatencyAllocation) -> LatencyAllocation:
        """Bisect the goal (geometrically, in the table's units) between the widest model measured
        under the aim and the narrowest goal measured over it, each allocation measured; the widest
        model at or under the aim is kept. Stops once one measures within CALIBRATED of the aim. Where
        no model measured over (a table that reads high throughout: the rounds stop at their first
        model, far under the aim), the upper end is the uncompressed model's prediction: the goal at
        which nothing is cut."""
        lo, hi = self.under_goal, self.over_goal
        if hi is None and lo is not None:
            hi = self.table.predict(self.sites, self.channels, self.channels)
        for _ in range(BISECT_STEPS):
            if lo is None or hi is None or lo >= hi or best.measured_ms >= CALIBRATED * self.aim:
                break
            mid = (lo * hi) ** 0.5
            widths, predicted, least, _ = self.widths_for(mid, first=False)
            if widths == best.widths:
                lo = mid
                continue
            ms = float(self.measure(shrunk_to(self.model, self.example_inputs, widths)))
            self.log.append({"goal_ms": mid, "predicted_ms": predicted, "measured_ms": ms, "widths": dict(widths),
                             "bisect": True})
            if ms > self.aim:
                hi = mid
                continue
            lo = mid
            if sum(widths.values()) > sum(best.widths.values()):
                best = LatencyAllocation(widths, self.channels, predicted, float(self.target.latency_ms), ms,
                                         rounds=self.log, least=least)
        return best


def settle(model: nn.Module, example_inputs, target, alloc: LatencyAllocation, table: LatencyTable, sites, measure,
           importance, aim: float, min_keep: float = MIN_KEEP, min_width: int = MIN_WIDTH) -> LatencyAllocation:
    """An allocation whose measurement is still over `aim` after the table's rounds (a table that
    reads optimistic): the narrowest model allowed (every group at its floor) is measured (once:
    the round-1 floor check's measurement is reused); when it misses the target too, the target
    is refused with the same TargetError as that check, so an unreachable target does not train.
    Else the model is cut further, measured (`narrow`, ignoring `least`: the target is within
    reach), until it measures at or under `aim`; if `narrow`'s trials run out with the model
    still over the target, the floor (measured under it) is taken. Deterministic given the
    measurements."""
    channels, log = alloc.channels, alloc.rounds
    smallest = floors(channels, min_keep, min_width)
    seen = [r for r in log if r.get("floor") and r.get("widths") == smallest]
    if seen:
        floor_ms = float(seen[0]["measured_ms"])
    else:
        floor_ms = float(measure(shrunk_to(model, example_inputs, smallest)))
        log.append({"goal_ms": None, "predicted_ms": table.predict(sites, smallest, channels), "measured_ms": floor_ms,
                    "widths": dict(smallest), "floor": True})
    over = alloc.measured_ms > target.latency_ms
    if floor_ms > target.latency_ms:
        if not over:
            return alloc  # over the aim, under the target; the floor reads no better: keep it
        if not _speedup_met_side_by_side(model, shrunk_to(model, example_inputs, smallest), example_inputs, target, log):
            raise unreachable(target, table, sites, channels, min_keep, min_width, floor_ms)
        return LatencyAllocation(dict(smallest), channels, table.predict(sites, smallest, channels),
                                 float(target.latency_ms), floor_ms, log, alloc.importance)
    if floor_ms > aim and not over:
        return alloc  # under the target; not even the floor reaches the margin: no channel is cut for it
    if alloc.widths == smallest:
        return alloc if not over else LatencyAllocation(dict(smallest), channels, alloc.predicted_ms, alloc.target_ms,
                                                        floor_ms, log, alloc.importance)
    start = LatencyAllocation(dict(alloc.widths), channels, alloc.predicted_ms, aim, alloc.measured_ms, log,
                              alloc.importance)
    cut = narrow(model, example_inputs, start, measure, max_trials=max(NARROW_TRIALS, 4 * len(channels)),
                 min_keep=min_keep, min_width=min_width, importance=importance)
    if cut.measured_ms > target.latency_ms:  # trials spent, still over: the floor, measured under the target
        return LatencyAllocation(dict(smallest), channels, table.predict(sites, smallest, channels),
                                 float(target.latency_ms), floor_ms, log, alloc.importance)
    predicted = table.predict(sites, cut.widths, channels)
    return LatencyAllocation(cut.widths, channels, predicted, float(target.latency_ms), cut.measured_ms, log,
                             alloc.importance)


def widen(model: nn.Module, example_inputs, alloc: LatencyAllocation, measure, max_trials: int = 12,
          min_keep: float = MIN_KEEP, min_width: int = MIN_WIDTH, importance=None) -> LatencyAllocation:
    """Give back channels the target can afford, measured: the table's steps are coarse and its
    costs approximate (a layer's ms is not smooth in its width on every runtime), so the
    allocation may sit well under the target. Each round times the next width of every group
    and keeps the one with the most importance regained per millisecond added, if it measures
    at or under the target twice (a noisy machine cannot sneak a wide model in on one lucky
    timing); stop when none fits or after `max_trials` timings. A group whose next width
    measured over the target is not tried again (widening the others only adds time), so the
    trials go to the groups that can still grow. `importance`: as in allocate_latency."""
    groups, _ = discover_groups(model, example_inputs)
    importance = importance if importance is not None else relative_importance(model, groups)
    channels, widths = alloc.channels, dict(alloc.widths)
    options = {g: allowed_widths(c, min_keep, min_width) for g, c in channels.items()}
    trials, measured, blocked = 0, alloc.measured_ms, set()

    def timed(trial: dict) -> float:
        nonlocal trials
        trials += 1
        ms = float(measure(shrunk_to(model, example_inputs, trial)))
        alloc.rounds.append({"goal_ms": alloc.target_ms, "predicted_ms": None, "measured_ms": ms, "widths": trial,
                             "widen": True})
        return ms

    while trials < max_trials:
        best = None
        for g, ws in options.items():
            if g in blocked or widths[g] not in ws or widths[g] == ws[-1] or trials >= max_trials:
                continue
            w = ws[ws.index(widths[g]) + 1]
            ms = timed({**widths, g: w})
            if ms > alloc.target_ms:
                blocked.add(g)
                continue
            score = importance.lost(g, w, widths[g]) / max(ms - measured, 0.01 * alloc.target_ms)
            if best is None or score > best[0]:
                best = (score, {**widths, g: w}, ms)
        if best is None or trials >= max_trials:
            break
        again = timed(best[1])
        if max(best[2], again) > alloc.target_ms:
            break
        widths, measured = best[1], max(best[2], again)
    return LatencyAllocation(widths, channels, alloc.predicted_ms, alloc.target_ms, measured, alloc.rounds)


def narrow(model: nn.Module, example_inputs, alloc: LatencyAllocation, measure, max_trials: int = 30,
           min_keep: float = MIN_KEEP, min_width: int = MIN_WIDTH, importance=None) -> LatencyAllocation:
    """Cut further, measured, while the allocation measures over its target: the table's
    allocation is only a prediction, and a table timed in another runtime (or under load) can
    stop where the deployed model is still far too slow. Each round times the next narrower
    width of every group on `measure` (the deployment runtime) and keeps the cut with the most
    measured ms saved per importance lost (the least important one when none saves), until the
    model measures at or under the target, every group is at its floor, or `max_trials` timings
    are spent. The result's `met` says whether the target was reached; when it was not, the
    narrowest model tried is returned, with what it measured. No group is cut under
    `alloc.least` (a target out of the table's reach: the cuts under it buy < tolerance,
    latency_knee), so a model that misses the target anyway keeps those channels."""
    groups, _ = discover_groups(model, example_inputs)
    importance = importance if importance is not None else relative_importance(model, groups)
    channels, widths, measured = alloc.channels, dict(alloc.widths), alloc.measured_ms
    least = alloc.least or {}
    options = {g: [w for w in allowed_widths(c, min_keep, min_width) if w >= least.get(g, 0)] or [widths[g]]
               for g, c in channels.items()}
    if measured is None:
        measured = float(measure(shrunk_to(model, example_inputs, widths)))
    trials = 0
    while measured > alloc.target_ms and trials < max_trials:
        tried = []
        for g, ws in options.items():
            k = ws.index(widths[g]) if widths[g] in ws else len([w for w in ws if w < widths[g]])
            if k == 0 or trials >= max_trials:
                continue
            trial = {**widths, g: ws[k - 1]}
            ms = float(measure(shrunk_to(model, example_inputs, trial)))
            trials += 1
            alloc.rounds.append({"goal_ms": alloc.target_ms, "predicted_ms": None, "measured_ms": ms,
                                 "widths": trial, "narrow": True})
            lost = max(importance.lost(g, widths[g], ws[k - 1]), 1e-9)
            tried.append(((measured - ms) / lost if ms < measured else -lost, trial, ms))
        if not tried:
            break  # every group at its floor
        _, widths, measured = max(tried, key=lambda t: t[0])
    return LatencyAllocation(widths, channels, alloc.predicted_ms, alloc.target_ms, measured, alloc.rounds,
                             alloc.importance, alloc.least)


def goal_at_the_floor(model: nn.Module, example_inputs, target, table: LatencyTable, sites, channels: dict[str, int],
                      measure, min_keep: float, min_width: int, log: list, aim: float | None = None) -> float:
    """The goal in the table's units when the table puts even the narrowest model over the target:
    that model measured, and the target refused only if it measures over the target too.

    Why: the table sums each layer timed alone, interleaved with its other widths; for small
    layers those times read high (their caches go cold between calls), so on a model of many
    small layers the sum can exceed what the whole model measures (transformers' ResNet at
    batch 8: the narrowest model predicted over the uncompressed one's time). The runtime judges,
    as it does for every allocation after this one. `aim`: what the allocation aims at (the target
    less allocate_latency's margin; default the target)."""
    smallest = floors(channels, min_keep, min_width)
    predicted = table.predict(sites, smallest, channels)
    if measure is False:
        raise unreachable(target, table, sites, channels, min_keep, min_width)
    narrowest = shrunk_to(model, example_inputs, smallest)
    measured = float(measure(narrowest))
    log.append({"goal_ms": None, "predicted_ms": predicted, "measured_ms": measured, "widths": dict(smallest),
                "floor": True})
    if measured > target.latency_ms and not _speedup_met_side_by_side(model, narrowest, example_inputs, target, log):
        raise unreachable(target, table, sites, channels, min_keep, min_width, measured)
    return float(target.latency_ms if aim is None else aim) * predicted / measured


def _speedup_met_side_by_side(model: nn.Module, narrowest: nn.Module, example_inputs, target, log: list) -> bool:
    """Whether a speed-up target the narrowest model missed on its own reading is met with the two models timed
    interleaved, as the run's final check times them. Why: a speed-up's milliseconds come from the uncompressed
    model timed a while before the narrowest one; on a busy machine the two readings met different loads, and a
    1.5x target refused as out of reach (the narrowest model "1.29x as fast") measured 1.87x side by side."""
    if getattr(target, "speedup", None) is None:
        return False
    if any(r.get("side_by_side") and r.get("met") for r in log):  # read so once already (the table's floor check)
        return True
    verdict = latency_against_target(model, narrowest, example_inputs, target)
    log.append({"goal_ms": verdict["goal_ms"], "predicted_ms": None, "measured_ms": verdict["interleaved_ms"]["compressed"],
                "widths": None, "floor": True, "side_by_side": True, "speedup": verdict["speedup"],
                "met": bool(verdict["met"])})
    return bool(verdict["met"])


def _loaded() -> bool:
    """More runnable jobs than cores over the last minute (a measured floor then says little about the model)."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return False


def unreachable(target, table: LatencyTable, sites, channels: dict[str, int], min_keep: float,
                min_width: int = MIN_WIDTH, measured_ms: float | None = None):
    """The TargetError for a target below the narrowest model the bounds allow (`measured_ms`:
    that model's measured time, when it was timed)."""
    from .targets import TargetError

    smallest = floors(channels, min_keep, min_width)
    asked, fix = f"target.latency_ms: {target.latency_ms} ms", "Raise target.latency_ms"
    if measured_ms is not None and getattr(target, "speedup", None) is None and _loaded():
        fix = (f"This machine is busy (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores), which slows "
               "every timing: time again on a quiet machine. Else, raise target.latency_ms")
    floor_ms = table.predict(sites, smallest, channels) if measured_ms is None else measured_ms
    if getattr(target, "speedup", None) is not None:  # milliseconds derived from the uncompressed model's
        dense = target.latency_ms * target.speedup
        asked = (f"target.speedup: {target.speedup:g}x ({target.latency_ms:.4g} ms: the uncompressed model, timed now "
                 f"at {dense:.4g} ms, / {target.speedup:g})")
        fix = f"Lower target.speedup (the narrowest model is {dense / floor_ms:.2f}x as fast as the uncompressed one"
        fix += ", and missed it timed side by side with it too)" if measured_ms is not None else ")"
        if measured_ms is not None and _loaded():
            fix = (f"This machine is busy (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores), which "
                   f"moves every timing: time again on a quiet machine. Else, {fix[0].lower()}{fix[1:]}")
        if measured_ms is not None and measured_ms >= dense:  # no faster than dense
            fix = ("The narrowest model measured no faster than the uncompressed one, which says more about the machine's "
                   "load than the model: time again on a quiet machine. Else, lower target.speedup")
    at = (f"predicted at {floor_ms:.3f} ms" if measured_ms is None else f"measured at {measured_ms:.3f} ms")
    at += f" ({table.runtime} {table.precision}, {table.threads} thread(s))"
    batch = " or lower target.batch" if target.batch > 1 else ""
    if not channels:
        return TargetError(
            f"{asked} at batch {target.batch} cannot be met: no channel can be removed from this model, which has no "
            f"channel group prune_structured may prune (`jointcompress dry-run` lists every layer and why it keeps its "
            f"width: a normalization over the channels, the output layer, prune_structured's targets / exclude, ...); "
            f"the model as it is was {at}. Make channel groups prunable (targets / exclude, or the model), "
            + ("raise target.latency_ms" if getattr(target, "speedup", None) is None else "or drop target.speedup")
            + (f"{batch}" if getattr(target, "speedup", None) is None else ""))
    shown = ", ".join(f"{g} {w} of {channels[g]}" for g, w in sorted(smallest.items())[:8])
    more = f", ... ({len(smallest)} groups)" if len(smallest) > 8 else ""
    return TargetError(
        f"{asked} at batch {target.batch} cannot be met by removing channels; "
        f"the narrowest model allowed (every group at its floor: the fewest channels at or above the largest of "
        f"{100 * min_keep:g}% of its channels, {min_width} channels (all of a narrower group) and one kernel step "
        f"(16 / 8 / 4 for groups of >= 128 / 32 / 12 channels), on a multiple of that step; here {shown}{more}) is {at}. "
        f"{fix}{batch}. Only {len(channels)} channel group(s) can narrow ({', '.join(sorted(channels))}): "
        "`jointcompress dry-run` lists the model's groups and why the other layers keep their width"
    )


def timed_ms(model: nn.Module, example_inputs, batch: int, threads: int = DEFAULT_THREADS, rounds: int = 30,
             repeats: int = REPEATS) -> float:
    """Ms of one model at `batch`: the least of `repeats` medians (deploy.timing.steady_ms)."""
    x = batch_of(example_inputs, batch)
    model = model.eval()
    return steady_ms(lambda: call_model(model, x), threads, rounds, repeats)


# -- physically shrunk copies ------------------------------------------------------------

@torch.no_grad()
def shrunk_to(model: nn.Module, example_inputs, widths: dict[str, int]) -> nn.Module:
    """A copy with every channel group cut to `widths[group]` channels (its strongest kept)."""
    from .graph import channel_norms, root_weight

    m = copy.deepcopy(model).eval()
    groups, _ = discover_groups(m, example_inputs)
    modules = dict(m.named_modules())
    plan = {}
    for g in groups:
        keep = max(1, min(g.channels, int(widths.get(g.name, g.channels))))
        plan[g.name] = torch.argsort(channel_norms(g, modules, root_weight), descending=True)[keep:].tolist()
    dg = build_graph(m, example_inputs)
    for name, drop in plan.items():
        if drop:
            root = modules[name]
            dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, drop).prune()
    return m


def shrunk_copy(model: nn.Module, example_inputs, sparsity: float) -> nn.Module:
    """A copy with `sparsity` of every channel group's weakest channels physically removed."""
    if sparsity <= 0:
        return copy.deepcopy(model).eval()
    groups, _ = discover_groups(model, example_inputs)
    return shrunk_to(model, example_inputs, {g.name: max(1, round(g.channels * (1 - sparsity))) for g in groups})


def with_latency_budgets(data: dict, alloc: LatencyAllocation):
    """The recipe dict with prune_structured set to the allocation's per-group sparsity
    (added, magnitude criterion, if missing); unchanged when no channel has to go."""
    from .recipe import parse_recipe

    found = [t for t in data["techniques"] if t["type"] == "prune_structured"]
    per = {g: min(0.99, s) for g, s in alloc.layer_sparsity.items()}  # 0.0 too: unlisted groups get `sparsity`
    if found:
        found[0].update(sparsity=min(0.99, alloc.overall_sparsity), scope="layer", layer_sparsity=per)
    elif any(s > 0 for s in per.values()):
        data["techniques"].insert(0, {"type": "prune_structured", "sparsity": min(0.99, alloc.overall_sparsity),
                                      "criterion": "magnitude", "scope": "layer", "layer_sparsity": per})
    return parse_recipe(data, source="resolved target")


def resolve_latency(model: nn.Module, data: dict, example_inputs, target, measure_dense=None):
    """resolve_target's latency branch: allocate, then write the per-group budgets. A `speedup`
    target becomes milliseconds here: the uncompressed model timed now, the same way the shrunk
    models are (`measure_dense(model) -> ms`, default timed_ms at target.batch), divided by it.
    Timed on the CPU, the deployment the targets are for: a model on a GPU is allocated from a CPU copy."""
    began = time.perf_counter()
    model, example_inputs = on_cpu(model)[0], to_device(example_inputs, torch.device("cpu"))
    targets, exclude = _structured_scope(data)
    base = allocation_base(model, data, example_inputs)  # what the allocation shrinks (read, not changed)
    check_batch_fits(base, example_inputs, target.batch)  # before the tables time it
    allocate = lambda t: allocate_latency(base, example_inputs, t, targets=targets, exclude=exclude,  # noqa: E731
                                          margin=ACCEPT_MARGIN)
    if target.speedup is None:
        alloc = allocate(target)
    else:
        measure_dense = measure_dense or (lambda m: timed_ms(m, example_inputs, target.batch))
        dense_ms = float(measure_dense(copy.deepcopy(model)))
        alloc = allocate(target.model_copy(update={"latency_ms": dense_ms / target.speedup}))
        if alloc.channels and alloc.widths == alloc.channels:  # nothing cut "met" a speed-up: the reading was slow
            again = float(measure_dense(copy.deepcopy(model)))
            if again < dense_ms:
                dense_ms = again
                alloc = allocate(target.model_copy(update={"latency_ms": again / target.speedup}))
    _confirmed_at_the_floor(model, base, example_inputs, target, alloc)
    _say_met_uncut(target, alloc)
    # the rounds log each candidate; the widths kept (after widening or narrowing) were said nowhere but history.json
    log.info("latency allocation: kept %s, measured %.3f ms (goal %.3f ms)",
             ", ".join(f"{g} {w} of {alloc.channels[g]}" for g, w in sorted(alloc.widths.items())) or "every channel",
             alloc.measured_ms if alloc.measured_ms is not None else float("nan"), alloc.target_ms)
    recipe = with_latency_budgets(data, alloc)
    recipe._resolution = {"event": "latency_allocation", "step": 0, "goal_ms": alloc.target_ms,
                          "predicted_ms": alloc.predicted_ms, "measured_ms": alloc.measured_ms, "met": alloc.met,
                          "widths": dict(alloc.widths), "channels": dict(alloc.channels),
                          "aim_ms": alloc.target_ms * (1 - ACCEPT_MARGIN),
                          "seconds": round(time.perf_counter() - began, 1),  # before the first step
                          # a speed-up's goal is this reading of the uncompressed model / speedup (cli._latency_line)
                          **({"uncompressed_ms": dense_ms} if target.speedup is not None else {}),
                          "timed_as": f"PyTorch fp32 at batch {target.batch}, the least of {REPEATS} medians timed alone, "
                                      f"accepted at or under {100 * (1 - ACCEPT_MARGIN):g}% of the target (the run's final "
                                      "check times the finished model interleaved with the uncompressed one)"}
    return recipe


def _say_met_uncut(target, alloc: LatencyAllocation) -> None:
    """A target the model meets with every channel kept: the run trains its other techniques and prints "met" at
    about 1.0x, with no word that the latency target asked for nothing."""
    if not alloc.channels or alloc.widths != alloc.channels or not alloc.met:
        return
    asked = (f"target.speedup: {target.speedup:g}x" if target.speedup is not None
             else f"target.latency_ms: {target.latency_ms} ms")
    warnings.warn(f"{asked} at batch {target.batch}: the model with every channel kept measured {alloc.measured_ms:.3f} "
                  f"ms, within the target, so no channel is removed; for a faster model ask for "
                  f"{'a higher target.speedup' if target.speedup is not None else 'a lower target.latency_ms'}",
                  stacklevel=4)


def _confirmed_at_the_floor(model: nn.Module, base: nn.Module, example_inputs, target, alloc: LatencyAllocation) -> None:
    """An allocation that cuts every group to its floor, accepted on the probes' reading (the least of REPEATS
    medians, timed alone), is timed as the run's final check times it (interleaved with the uncompressed model)
    and refused before training where it misses there: nothing narrower exists, and a ResNet at batch 1 trained
    the narrowest model, at the accuracy that cost, for a target its finished model then missed."""
    if not alloc.channels or alloc.widths != floors(alloc.channels):
        return
    from .targets import TargetError

    verdict = latency_against_target(model, shrunk_to(base, example_inputs, alloc.widths), example_inputs, target)
    if verdict["met"]:
        return
    ms, goal = verdict["interleaved_ms"], verdict["goal_ms"]
    asked = (f"target.speedup: {target.speedup:g}x" if target.speedup is not None
             else f"target.latency_ms: {target.latency_ms} ms")
    raise TargetError(
        f"{asked} at batch {target.batch} cannot be met by removing channels: the narrowest model allowed (every group "
        f"at its floor) measured {ms['compressed']:.3f} ms interleaved with the uncompressed model ({ms['uncompressed']:.3f} "
        f"ms), as the run's final check times it, over the goal of {goal:.3f} ms; the allocator's probe, timed alone, read "
        f"{alloc.measured_ms:.3f} ms. Training it would cut every group to its floor, at the accuracy that costs, for a "
        f"target the finished model misses. {'Lower target.speedup' if target.speedup is not None else 'Raise target.latency_ms'}"
        f"{' or lower target.batch' if target.batch > 1 else ''}, or time on a quiet machine")


def _structured_scope(data: dict) -> tuple[list[str], list[str]]:
    """prune_structured's targets and exclude in a recipe dict (all groups where it names none): the groups a
    latency target allocates."""
    chosen = next((t for t in data["techniques"] if t["type"] == "prune_structured"), {})
    return chosen.get("targets") or ["*"], chosen.get("exclude") or []


def refusal_before_training(untrained: nn.Module, recipe, example_inputs):
    """The TargetError for a latency target even the narrowest model allowed misses, checked on the
    untrained model, or None. A model's speed does not depend on its weights, so a command learns in
    seconds what the allocation would refuse after training the model first (an hour, for some models).
    The narrowest model (every group prune_structured may cut at its floor, on the model its prune_blocks
    and raise_stride leave) is timed as the allocation times it; refused only where it measures
    TIMING_SLACK over the target, since a timing on a busy machine reads slow and near the floor the run,
    timing it again, decides. A speedup target times the uncompressed model too."""
    target = recipe.target
    if target is None or not target.is_latency:
        return None
    model, example_inputs = on_cpu(untrained)[0], to_device(example_inputs, torch.device("cpu"))
    data = recipe.model_dump()
    base = allocation_base(model, data, example_inputs)
    _runs_the_batch(base, example_inputs, target.batch)
    groups, _ = discover_groups(base, example_inputs, *_structured_scope(data))
    channels = {g.name: g.channels for g in groups}
    narrowest = shrunk_to(base, example_inputs, floors(channels))
    floor_ms = timed_ms(narrowest, example_inputs, target.batch)
    if target.speedup is not None:
        target = target.model_copy(update={"latency_ms": timed_ms(copy.deepcopy(model), example_inputs, target.batch)
                                           / target.speedup})
    if floor_ms <= target.latency_ms or _speedup_met_side_by_side(model, narrowest, example_inputs, target, []):
        return None
    if floor_ms <= target.latency_ms * TIMING_SLACK:  # let through (a busy machine reads slow), and said
        asked = (f"target.speedup: {target.speedup:g}x" if target.speedup is not None
                 else f"target.latency_ms: {target.latency_ms}")
        warnings.warn(f"{asked} at batch {target.batch}: the narrowest model allowed measured {floor_ms:.3f} ms, over "
                      f"the target's {target.latency_ms:.3f} ms but within the {TIMING_SLACK:g}x a busy machine's "
                      "timing may add; the run times it again after training the model and refuses the target then "
                      "if it still misses (the trained model is kept for the next run): a lower target is safer",
                      stacklevel=3)
        return None
    return unreachable(target, LatencyTable(layers={}, batch=target.batch), {}, channels, MIN_KEEP, MIN_WIDTH,
                       floor_ms)


def met_uncut_before_training(untrained: nn.Module, recipe, example_inputs) -> str | None:
    """What compress warns once its allocation finds a target.latency_ms the model meets with every channel kept
    (_say_met_uncut), found on the untrained model: `recipe validate` said "ok" to a target of 10 ms at the default
    batch 1 for a model of 1.3 ms, and the run removed nothing. None where the model is slower than the target (or
    the target is a speed-up, which the uncompressed model never meets)."""
    target = recipe.target
    if target is None or target.latency_ms is None:
        return None
    model, example_inputs = on_cpu(untrained)[0], to_device(example_inputs, torch.device("cpu"))
    ms = timed_ms(model, example_inputs, target.batch)
    if ms > target.latency_ms:
        return None
    return (f"target.latency_ms: {target.latency_ms} ms at batch {target.batch}: the model with every channel kept "
            f"measured {ms:.3f} ms, within the target, so no channel would be removed; for a faster model ask for a "
            f"lower target.latency_ms{' (or a larger target.batch: batch 1 is its default)' if target.batch == 1 else ''}")


def _runs_the_batch(model: nn.Module, example_inputs, batch: int) -> None:
    """A target's batch the model cannot run (one sized for 64 rows, timed at 128) stopped the timing in torch's
    own error, a traceback; one past this machine's memory had the process killed without a word
    (batch_memory.check_batch_fits)."""
    from .targets import TargetError

    check_batch_fits(model, example_inputs, batch)
    try:
        with torch.no_grad():
            call_model(model.eval(), batch_of(example_inputs, batch))
    except Exception as err:  # noqa: BLE001 -- whatever the model raises, the batch is what the target chose
        raise TargetError(f"target.batch: {batch}: the model cannot run a batch of {batch} rows ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160]}); set target.batch to the batch the model serves") from None


def latency_against_target(uncompressed: nn.Module, compressed: nn.Module, example_inputs, target,
                           threads: int = DEFAULT_THREADS, rounds: int = 30) -> dict:
    """The finished model against its latency target: both models timed at target.batch, the
    honest way (deploy.timing: interleaved medians, each also alone), in PyTorch fp32 as the
    allocator timed them. For a speedup target the goal is the uncompressed model's time now / speedup."""
    from .bench import timed_sides

    models = {"uncompressed": copy.deepcopy(uncompressed).eval(), "compressed": copy.deepcopy(compressed).eval()}
    timing = timed_sides(models, example_inputs, [target.batch], rounds, threads)[target.batch]
    ms = timing.interleaved_ms
    goal = ms["uncompressed"] / target.speedup if target.speedup is not None else float(target.latency_ms)
    verdict = {"batch": target.batch, "threads": threads, "goal_ms": goal, "interleaved_ms": ms,
               "alone_ms": timing.alone_ms, "speedup": ms["uncompressed"] / ms["compressed"],
               "met": ms["compressed"] <= goal, "flagged": timing.flagged, "machine": timing.machine}
    if target.speedup is not None and target.speedup > 1 and _same_shapes(models["uncompressed"], models["compressed"]):
        verdict.update(met=False, note="the compressed model has the uncompressed one's widths: a speed-up measured "
                                       "between them is the machine's load, not the model")
    return verdict


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold tensors of the same names and shapes (the same architecture, channels and all)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)

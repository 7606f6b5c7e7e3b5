"""Latency targets: the allocation from a known (fake) latency table respects the target, keeps
channel counts on kernel-friendly multiples, spends the cut where it is cheapest, and the shrunk
model really has the allocated widths. No timing here: tables are fake and confirmation is off."""
import warnings

import pytest
import torch
import torch.nn as nn

from jointcompress.graph import discover_groups
from jointcompress.latency_targets import (LatencyTable, allocate_latency, allowed_widths, kernel_multiple,
                                           layer_sites, shrunk_to, with_latency_budgets)
from jointcompress.models import build_model
from jointcompress.recipe import Target
from jointcompress.targets import TargetError


def mac_table(model, x, ms_per_mac=1e-6, constant=0.05, grid=(1, 2, 4, 8, 16, 20, 24, 32, 50, 64, 128, 200, 400, 500, 800)):
    """A known table: every layer costs ms_per_mac per multiply-accumulate of one sample."""
    groups, _ = discover_groups(model, x)
    sites = layer_sites(model, x, groups)
    layers = {}
    for name, s in sites.items():
        spatial = 1
        if len(s.input_shape) == 3:  # conv: output positions
            k, st, p = s.spec["kernel_size"], s.spec["stride"], s.spec["padding"]
            h = (s.input_shape[1] + 2 * p[0] - k[0]) // st[0] + 1
            w = (s.input_shape[2] + 2 * p[1] - k[1]) // st[1] + 1
            spatial = h * w * k[0] * k[1]
        cins = sorted({c for c in grid if c <= s.cin} | {s.cin})
        couts = sorted({c for c in grid if c <= s.cout} | {s.cout})
        layers[name] = {"cin": cins, "cout": couts, "ms": [[ms_per_mac * ci * co * spatial for co in couts] for ci in cins]}
    return LatencyTable(layers, constant), sites, {g.name: g.channels for g in groups}


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return build_model("lenet5").eval(), torch.randn(2, 1, 28, 28)


def test_kernel_friendly_widths():
    assert kernel_multiple(500) == 16 and kernel_multiple(50) == 8 and kernel_multiple(20) == 4
    ws = allowed_widths(500)
    assert ws[-1] == 500 and all(w % 16 == 0 for w in ws[:-1]) and ws[0] >= 25
    assert allowed_widths(20) == [8, 12, 16, 20] and allowed_widths(6) == [6]


def test_table_interpolates_between_grid_points(lenet):
    model, x = lenet
    table, _, _ = mac_table(model, x)
    exact = table.layer_ms("fc2", 500, 10)
    assert table.layer_ms("fc2", 450, 10) == pytest.approx(exact * 450 / 500, rel=1e-6)


@pytest.mark.parametrize("fraction", [0.6, 0.3, 0.15])
def test_allocation_meets_the_target_on_a_known_table(lenet, fraction):
    model, x = lenet
    table, sites, channels = mac_table(model, x)
    full = table.predict(sites, channels, channels)
    target = Target(latency_ms=full * fraction, batch=1)
    alloc = allocate_latency(model, x, target, table=table, measure=False)
    assert alloc.predicted_ms <= target.latency_ms
    assert alloc.predicted_ms == pytest.approx(table.predict(sites, alloc.widths, channels))
    for g, w in alloc.widths.items():
        assert w in allowed_widths(channels[g])
    assert alloc.widths != channels


def test_generous_target_keeps_every_channel_and_impossible_one_names_the_field(lenet):
    model, x = lenet
    table, sites, channels = mac_table(model, x)
    full = table.predict(sites, channels, channels)
    alloc = allocate_latency(model, x, Target(latency_ms=full * 1.5), table=table, measure=False)
    assert alloc.widths == channels and alloc.overall_sparsity == 0
    with pytest.raises(TargetError, match="latency_ms"):
        allocate_latency(model, x, Target(latency_ms=table.constant_ms * 0.5), table=table, measure=False)


def test_a_speedup_target_is_the_uncompressed_models_time_divided_by_it(lenet, monkeypatch, caplog):
    """`target: {speedup}` is timed against the uncompressed model when the run starts, so a loaded
    machine, which reads every model slower alike, asks for the same widths as a quiet one."""
    from jointcompress import latency_targets

    import logging

    caplog.set_level(logging.INFO, logger="jointcompress.latency")
    model, x = lenet
    table, sites, channels = mac_table(model, x)
    full = table.predict(sites, channels, channels)
    widths = []
    for load in (1.0, 2.5):  # the machine reads the dense model and every shrunk one `load` times slower
        asked = []

        def allocate(m, ex, target, load=load, **_):  # the fake table, read at this load (no timing)
            asked.append(target.latency_ms)
            return allocate_latency(m, ex, target.model_copy(update={"latency_ms": target.latency_ms / load}),
                                    table=table, measure=False)

        monkeypatch.setattr(latency_targets, "allocate_latency", allocate)
        recipe = latency_targets.resolve_latency(model, {"model": "lenet5", "techniques": [{"type": "distill_kd"}]}, x,
                                                 Target(speedup=4.0), measure_dense=lambda m, load=load: load * full)
        assert asked == [pytest.approx(load * full / 4)]
        ps = recipe.technique("prune_structured")
        widths.append({g: round(channels[g] * (1 - s)) for g, s in ps.layer_sparsity.items()})
        assert table.predict(sites, widths[-1], channels) <= full / 4
    assert widths[0] == widths[1]
    # the widths kept are said (the rounds' lines said each candidate, the kept one nowhere)
    kept = [r.getMessage() for r in caplog.records if "latency allocation: kept" in r.getMessage()]
    assert kept and all(f"{g} {w} of {channels[g]}" in kept[-1] for g, w in widths[-1].items()), kept


def test_a_speedup_target_is_checked_and_named(lenet):
    with pytest.raises(ValueError, match="exactly one of size_kb, ratio, latency_ms, speedup"):
        Target(speedup=4.0, latency_ms=1.0)
    with pytest.raises(ValueError, match="speedup"):
        Target(speedup=0.5)
    assert Target(speedup=4.0).is_latency and Target(latency_ms=1.0).is_latency and not Target(ratio=10).is_latency
    model, x = lenet
    table, _, _ = mac_table(model, x)
    asked = Target(speedup=1000.0, batch=1).model_copy(update={"latency_ms": table.constant_ms * 0.5})
    dense = table.constant_ms * 500  # the uncompressed model's time the goal was derived from
    with pytest.raises(TargetError, match=rf"target.speedup: 1000x \({asked.latency_ms:.4g} ms: the uncompressed model, "
                                          rf"timed now at {dense:.4g} ms, / 1000\).*Lower target.speedup \(the narrowest "
                                          r"model is \d+\.\d\dx as fast as the uncompressed one\)"):
        allocate_latency(model, x, asked, table=table, measure=False)


def test_confirmation_tightens_when_measured_over(lenet):
    model, x = lenet
    table, sites, channels = mac_table(model, x)
    full = table.predict(sites, channels, channels)
    target = Target(latency_ms=full * 0.5)
    first = allocate_latency(model, x, target, table=table, measure=False)
    slower = 1.05 * target.latency_ms / first.predicted_ms  # the first allocation measures 5% over
    seen = []

    def measure(shrunk):  # a "runtime" slower than the table says, by a fixed factor
        widths = {g: w for g, w in zip(channels, _widths(shrunk, x))}
        ms = slower * table.predict(sites, widths, channels)
        seen.append(ms)
        return ms

    alloc = allocate_latency(model, x, target, table=table, measure=measure)
    assert len(alloc.rounds) >= 2 and alloc.measured_ms <= target.latency_ms
    assert alloc.measured_ms == seen[-1] and seen[0] > target.latency_ms
    assert alloc.rounds[1]["goal_ms"] < alloc.rounds[0]["goal_ms"]


def _widths(m, x):
    groups, _ = discover_groups(m, x)
    return [g.channels for g in groups]


def test_shrunk_model_has_the_allocated_widths_and_recipe_gets_budgets(lenet):
    model, x = lenet
    table, sites, channels = mac_table(model, x)
    alloc = allocate_latency(model, x, Target(latency_ms=0.3 * table.predict(sites, channels, channels)),
                             table=table, measure=False)
    small = shrunk_to(model, x, alloc.widths)
    assert _widths(small, x) == [alloc.widths[g] for g in channels]
    assert small(x).shape == (2, 10)
    recipe = with_latency_budgets({"model": "lenet5", "techniques": [{"type": "distill_kd"}]}, alloc)
    ps = recipe.technique("prune_structured")
    for g, s in ps.layer_sparsity.items():  # the technique keeps round(c * (1 - s)) = the width
        assert round(channels[g] * (1 - s)) == alloc.widths[g]


def test_calibrate_scales_a_table_from_another_runtime(lenet):
    model, x = lenet
    table, sites, channels = mac_table(model, x)
    target = Target(latency_ms=0.4 * table.predict(sites, channels, channels))
    measure = lambda shrunk: 0.5 * table.predict(sites, dict(zip(channels, _widths(shrunk, x))), channels)  # noqa: E731
    plain = allocate_latency(model, x, target, table=table, measure=False)  # the table's word alone
    plain_ms = measure(shrunk_to(model, x, plain.widths))
    calibrated = allocate_latency(model, x, target, table=table, measure=measure, calibrate=True, max_rounds=4)
    assert plain_ms < 0.85 * target.latency_ms  # twice faster than the table: over-pruned
    assert plain_ms < calibrated.measured_ms <= target.latency_ms
    assert sum(calibrated.widths.values()) > sum(plain.widths.values())
    measured = allocate_latency(model, x, target, table=table, measure=measure)  # compress's path gives back too
    assert plain_ms < measured.measured_ms <= target.latency_ms and any(r.get("widen") for r in measured.rounds)


def test_widen_gives_back_what_the_measured_target_affords(lenet):
    """A fake runtime whose ms is the kept channels: widen grows groups while it stays under the
    target, never over it, records each trial, and respects min_width."""
    from jointcompress.latency_targets import LatencyAllocation, widen

    model, x = lenet
    channels = {"conv1": 20, "conv2": 50, "fc1": 500}
    fake_ms = lambda m: float(sum(discover_groups(m, x)[0][i].channels for i in range(3)))  # noqa: E731
    start = LatencyAllocation({"conv1": 8, "conv2": 8, "fc1": 32}, channels, 1.0, target_ms=100.0, measured_ms=48.0)
    out = widen(model, x, start, fake_ms, max_trials=20)
    assert out.measured_ms <= 100.0 and sum(out.widths.values()) > 48
    assert all(out.widths[g] >= start.widths[g] for g in channels)
    widened = [r for r in out.rounds if r.get("widen")]
    assert widened and all(r["measured_ms"] == sum(r["widths"].values()) for r in widened)
    assert fake_ms(shrunk_to(model, x, out.widths)) == out.measured_ms
    tight = widen(model, x, LatencyAllocation(dict(start.widths), channels, 1.0, 48.0, 48.0), fake_ms, max_trials=5)
    assert tight.widths == start.widths and len([r for r in tight.rounds if r.get("widen")]) <= 5


def test_widen_stops_trying_a_group_that_measured_over(lenet):
    """A group whose next width is over the target (here conv1: any width above 4 costs 1000)
    is timed once, and the trials go to the groups that can still grow."""
    from jointcompress.latency_targets import LatencyAllocation, widen

    model, x = lenet
    channels = {"conv1": 20, "conv2": 50, "fc1": 500}

    def fake_ms(m):
        kept = {g.name: g.channels for g in discover_groups(m, x)[0]}
        return float(sum(kept.values()) + (1000 if kept["conv1"] > 4 else 0))

    start = LatencyAllocation({"conv1": 4, "conv2": 8, "fc1": 32}, channels, 1.0, target_ms=120.0, measured_ms=44.0)
    out = widen(model, x, start, fake_ms, max_trials=12, min_width=4)
    trials = [r for r in out.rounds if r.get("widen")]
    assert len([r for r in trials if r["widths"]["conv1"] > 4]) == 1
    assert out.widths["conv1"] == 4 and out.measured_ms <= 120.0 and sum(out.widths.values()) > 44


def test_greedy_jumps_over_a_flat_step_of_a_noisy_table(lenet):
    """A measured table can read the same ms at two widths; the cut must not stop there."""
    from jointcompress.latency_targets import greedy_widths, relative_importance

    model, x = lenet
    groups, _ = discover_groups(model, x)
    channels = {g.name: g.channels for g in groups}

    class Plateau:  # conv2 costs 1 ms per channel, but 40..50 channels all read as 50
        def predict(self, sites, widths, channels):
            c2 = widths["conv2"]
            return float(50 if c2 >= 40 else c2) + widths["conv1"] * 0 + widths["fc1"] * 0

    widths, predicted = greedy_widths(Plateau(), {}, channels, relative_importance(model, groups), 20.0)
    assert predicted <= 20.0 and widths["conv2"] <= 20


def test_flat_table_keeps_cutting_towards_the_floors(lenet):
    """A table that reads the same ms at every width (timed under load) cannot reach the target;
    the cut must still go on, the least important step first, down to every group's floor, rather
    than stop at full width."""
    from jointcompress.latency_targets import LatencyTable, floors, greedy_widths, relative_importance

    model, x = lenet
    groups, _ = discover_groups(model, x)
    channels = {g.name: g.channels for g in groups}
    sites = layer_sites(model, x, groups)
    flat = LatencyTable({n: {"cin": [s.cin], "cout": [s.cout], "ms": [[1.0]]} for n, s in sites.items()}, 0.5)
    assert flat.predict(sites, floors(channels), channels) == flat.predict(sites, channels, channels)
    widths, predicted = greedy_widths(flat, sites, channels, relative_importance(model, groups), 0.1)
    assert widths == floors(channels) and predicted > 0.1
    assert floors(channels) == {"conv1": 8, "conv2": 8, "fc1": 32}


def test_flat_table_allocation_is_judged_by_the_runtime(lenet):
    """Calibrating on a flat table, the allocation reaches the floors, and the runtime (here a fake
    one: ms = kept channels) decides: a target the floors meet is met (and recorded as met); one
    even the floors miss is reported as not met, with what the narrowest model measured."""
    from jointcompress.latency_targets import LatencyTable, floors

    model, x = lenet
    groups, _ = discover_groups(model, x)
    channels = {g.name: g.channels for g in groups}
    sites = layer_sites(model, x, groups)
    flat = LatencyTable({n: {"cin": [s.cin], "cout": [s.cout], "ms": [[1.0]]} for n, s in sites.items()}, 0.5)
    fake_ms = lambda m: float(sum(_widths(m, x)))  # noqa: E731
    narrowest = float(sum(floors(channels).values()))
    alloc = allocate_latency(model, x, Target(latency_ms=narrowest + 1), table=flat, measure=fake_ms, calibrate=True)
    assert alloc.met and alloc.measured_ms <= narrowest + 1 and alloc.widths == floors(channels)
    missed = allocate_latency(model, x, Target(latency_ms=narrowest - 1), table=flat, measure=fake_ms, calibrate=True)
    assert missed.met is False and missed.measured_ms == narrowest and missed.to_dict()["met"] is False


def test_narrow_cuts_measured_until_the_target_is_met(lenet):
    """An allocation that measures over its target is cut further on the (fake) runtime, one
    measured step at a time, and stops as soon as it measures at or under the target; a target
    under the floors ends at the floors, not met."""
    from jointcompress.latency_targets import LatencyAllocation, floors, narrow

    model, x = lenet
    channels = {"conv1": 20, "conv2": 50, "fc1": 500}
    fake_ms = lambda m: float(sum(_widths(m, x)))  # noqa: E731
    start = LatencyAllocation(dict(channels), channels, 1.0, target_ms=400.0, measured_ms=570.0)
    out = narrow(model, x, start, fake_ms, max_trials=200)
    assert out.met and 400.0 - 16 < out.measured_ms <= 400.0  # stopped right after crossing (steps of <= 16)
    assert out.measured_ms == fake_ms(shrunk_to(model, x, out.widths))
    assert all(r["measured_ms"] == sum(r["widths"].values()) for r in out.rounds if r.get("narrow"))
    low = narrow(model, x, LatencyAllocation(dict(channels), channels, 1.0, 10.0, 570.0), fake_ms, max_trials=200)
    assert low.met is False and low.widths == floors(channels) and low.measured_ms == sum(floors(channels).values())


def test_the_finished_model_is_judged_against_its_speedup_goal(lenet):
    """What the CLI prints after a latency-target run: both models timed together; the goal of a
    speedup target is the uncompressed model's time over it (logic only: no time is asserted)."""
    from jointcompress.latency_targets import latency_against_target

    model, x = lenet
    table, sites, channels = mac_table(model, x)
    alloc = allocate_latency(model, x, Target(latency_ms=0.3 * table.predict(sites, channels, channels)),
                             table=table, measure=False)
    small = shrunk_to(model, x, alloc.widths)
    r = latency_against_target(model, small, x, Target(speedup=2.0, batch=4), rounds=3)
    ms = r["interleaved_ms"]
    assert r["batch"] == 4 and r["goal_ms"] == pytest.approx(ms["uncompressed"] / 2)
    assert r["speedup"] == pytest.approx(ms["uncompressed"] / ms["compressed"])
    assert r["met"] == (ms["compressed"] <= r["goal_ms"]) and set(r["alone_ms"]) == {"uncompressed", "compressed"}
    r = latency_against_target(model, small, x, Target(latency_ms=123.0), rounds=3)
    assert r["goal_ms"] == 123.0


def test_a_table_that_reads_high_does_not_refuse_a_target_the_narrowest_model_meets(lenet):
    """Layers timed alone can sum to more than the whole model measures. A target under the table's
    narrowest prediction is refused only when the narrowest model, measured, misses it too; when it
    meets it, the allocation goes on in the table's units and is met on the runtime."""
    from jointcompress.latency_targets import floors

    model, x = lenet
    true, sites, channels = mac_table(model, x)
    high = LatencyTable({n: {**t, "ms": [[3 * v for v in row] for row in t["ms"]]} for n, t in true.layers.items()},
                        3 * true.constant_ms)
    runtime = lambda m: true.predict(sites, dict(zip(channels, _widths(m, x))), channels)  # noqa: E731
    narrowest = true.predict(sites, floors(channels), channels)
    assert high.predict(sites, floors(channels), channels) > 2 * narrowest
    alloc = allocate_latency(model, x, Target(latency_ms=1.5 * narrowest), table=high, measure=runtime)
    assert alloc.met and alloc.measured_ms <= 1.5 * narrowest and alloc.widths != floors(channels)
    assert alloc.rounds[0]["widths"] == floors(channels)  # the floor was measured first
    with pytest.raises(TargetError, match=r"narrowest model allowed .* is measured at.*"
                                          r"Only \d+ channel group\(s\) can narrow .*jointcompress dry-run"):
        allocate_latency(model, x, Target(latency_ms=0.9 * narrowest), table=high, measure=runtime)
    with pytest.raises(TargetError, match=r"is predicted at"):  # no runtime to ask: the table's word
        allocate_latency(model, x, Target(latency_ms=1.5 * narrowest), table=high, measure=False)
    # a speedup target whose narrowest model measured no faster than the uncompressed one: a busy machine
    from jointcompress.latency_targets import unreachable

    busy = Target(speedup=2, batch=1).model_copy(update={"latency_ms": 0.5 * narrowest})  # dense: `narrowest` ms
    slow = unreachable(busy, high, sites, channels, 0.05, measured_ms=2 * narrowest)
    assert "no faster than the uncompressed one" in str(slow)
    assert "no faster" not in str(unreachable(busy, high, sites, channels, 0.05, measured_ms=0.8 * narrowest))


def test_a_latency_target_run_records_the_allocators_own_timing_and_verdict(monkeypatch):
    """The allocator accepts widths by its own timing (the least of a few medians, timed alone); the run's
    final check times the finished model interleaved with the uncompressed one, and may read otherwise.
    Only the final verdict was recorded: the allocator's is now in the history too. (Its timings are a
    fake here: real ones belong in benchmarks/.)"""
    from jointcompress import compress
    from jointcompress import latency_targets as lt

    def allocate(model, example_inputs, target, **kwargs):
        return lt.LatencyAllocation(widths={"0": 128}, channels={"0": 256}, predicted_ms=1.0, target_ms=target.latency_ms,
                                    measured_ms=1.5)

    monkeypatch.setattr(lt, "allocate_latency", allocate)
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    y = x[:, :4].argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    recipe = {"techniques": [{"type": "prune_structured", "sparsity": 0.5}], "target": {"latency_ms": 2.0, "batch": 8},
              "training": {"epochs": 1, "batch_size": 64}}
    res = compress(model, recipe, (x, y), lambda m: 0.0)
    event = next(e for e in res.history.events if e["event"] == "latency_allocation")
    assert {k: event[k] for k in ("goal_ms", "predicted_ms", "measured_ms", "met", "widths")} == {
        "goal_ms": 2.0, "predicted_ms": 1.0, "measured_ms": 1.5, "met": True, "widths": {"0": 128}}
    assert "timed alone" in event["timed_as"] and res.recipe.technique("prune_structured").layer_sparsity == {"0": 0.5}
    assert event["seconds"] >= 0  # how long the allocation took before the first step (the history had no word)
    # the Python API's verdict, as the command line judges it: the compressed model timed with the uncompressed one
    uncompressed = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    keys = list(res.model.state_dict())
    verdict = res.latency_verdict(uncompressed, rounds=3)  # on a finalized copy: the run's model keeps its masks
    assert list(res.model.state_dict()) == keys and any("parametrizations" in k for k in keys)
    assert verdict["batch"] == 8 and verdict["goal_ms"] == 2.0 and set(verdict["interleaved_ms"]) == {"uncompressed", "compressed"}
    assert verdict["met"] == (verdict["interleaved_ms"]["compressed"] <= 2.0)
    from jointcompress import RecipeError

    sized = compress(torch.nn.Sequential(torch.nn.Linear(32, 4)), {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5}],
                     "training": {"epochs": 1, "batch_size": 64}}, (x, y), lambda m: 0.0)
    with pytest.raises(RecipeError, match="not a latency target"):
        sized.latency_verdict(uncompressed)


# -- re-check fixes: the technique's selection, optimistic tables, concatenations, messages, margin ------------

def _true_runtime(table, sites, channels, x, overhead=0.0):
    """A fake runtime: the table's prediction for the shrunk model's widths, plus a constant the table misses."""
    return lambda m: table.predict(sites, dict(zip(channels, _widths(m, x))), channels) + overhead


def test_only_the_groups_the_technique_may_prune_are_allocated(lenet):
    """prune_structured's `exclude` / `targets`: an excluded group keeps its width (the allocator cut
    conv1 to 8 under `exclude: [conv1]`, and the technique then removed nothing)."""
    model, x = lenet
    table, sites, channels = mac_table(model, x)
    target = Target(latency_ms=0.3 * table.predict(sites, channels, channels))
    alloc = allocate_latency(model, x, target, table=table, measure=False, exclude=["conv1"])
    assert set(alloc.channels) == {"conv2", "fc1"} and "conv1" not in alloc.widths
    assert alloc.predicted_ms <= target.latency_ms  # met with conv1 at its 20 channels
    only = allocate_latency(model, x, Target(latency_ms=0.97 * table.predict(sites, channels, channels)), table=table,
                            measure=False, targets=["fc1"])
    assert set(only.widths) == {"fc1"} and only.widths["fc1"] < 500


def _faked_timing(lt, model, x, monkeypatch):
    """The model's MAC table as its latency table, and a runtime that times a model by it (_true_runtime), in place
    of the measured ones: (table, sites, channels, runtime)."""
    table, sites, channels = mac_table(model, x)
    runtime = _true_runtime(table, sites, channels, x)
    monkeypatch.setattr(lt, "measure_table", lambda *a, **k: table)
    monkeypatch.setattr(lt, "timed_ms", lambda m, *a, **k: runtime(m))
    return table, sites, channels, runtime


def test_resolve_latency_follows_prune_structureds_selection_and_margin(lenet, monkeypatch):
    """compress's path (resolve_latency) hands the technique's targets / exclude to the allocator and
    accepts a measured model only ACCEPT_MARGIN under the target (fake table and runtime)."""
    from jointcompress import latency_targets as lt

    model, x = lenet
    table, sites, channels, runtime = _faked_timing(lt, model, x, monkeypatch)
    goal = 0.3 * table.predict(sites, channels, channels)
    data = {"model": "lenet5", "techniques": [{"type": "prune_structured", "exclude": ["conv1"]}, {"type": "distill_kd"}]}
    recipe = lt.resolve_latency(model, data, x, Target(latency_ms=goal, batch=1))
    event = recipe._resolution
    assert "conv1" not in event["widths"] and "conv1" not in recipe.technique("prune_structured").layer_sparsity
    assert event["met"] and event["measured_ms"] <= (1 - lt.ACCEPT_MARGIN) * goal
    assert event["measured_ms"] == pytest.approx(runtime(shrunk_to(model, x, event["widths"])))


def test_an_allocation_is_accepted_only_under_the_margin(lenet):
    model, x = lenet
    table, sites, channels = mac_table(model, x)
    runtime = _true_runtime(table, sites, channels, x)
    target = Target(latency_ms=0.3 * table.predict(sites, channels, channels))
    plain = allocate_latency(model, x, target, table=table, measure=runtime)
    aimed = allocate_latency(model, x, target, table=table, measure=runtime, margin=0.05)
    assert plain.measured_ms > 0.95 * target.latency_ms  # the table's allocation lands right at the target
    assert aimed.met and aimed.measured_ms <= 0.95 * target.latency_ms and aimed.target_ms == target.latency_ms


def test_an_optimistic_table_whose_floor_measures_over_refuses_the_target(lenet):
    """The table (no per-call overhead) says the target is reachable; every measured allocation is over,
    and so is the narrowest model: TargetError, not a run that trains and ends "not met"."""
    model, x = lenet
    table, sites, channels = mac_table(model, x)
    runtime = _true_runtime(table, sites, channels, x, overhead=0.5)
    floor_ms = runtime(shrunk_to(model, x, floors_of(channels)))
    target = Target(latency_ms=0.9 * floor_ms)
    assert table.predict(sites, floors_of(channels), channels) < target.latency_ms  # the table's word: reachable
    with pytest.raises(TargetError, match=rf"is measured at {floor_ms:.3f} ms"):
        allocate_latency(model, x, target, table=table, measure=runtime)


def test_an_optimistic_table_whose_floor_meets_the_target_is_narrowed_until_met(lenet):
    """The tightened rounds still measure over, the floor measures under: the allocation is cut further,
    measured (`narrow`), and returned met, not at the floor when a wider model meets it."""
    model, x = lenet
    table, sites, channels = mac_table(model, x)
    runtime = _true_runtime(table, sites, channels, x, overhead=0.5)
    floor_ms = runtime(shrunk_to(model, x, floors_of(channels)))
    target = Target(latency_ms=floor_ms + 0.01)
    alloc = allocate_latency(model, x, target, table=table, measure=runtime)
    assert alloc.met and alloc.measured_ms <= target.latency_ms
    assert alloc.measured_ms == pytest.approx(runtime(shrunk_to(model, x, alloc.widths)))
    assert alloc.widths != floors_of(channels) and sum(alloc.widths.values()) > sum(floors_of(channels).values())
    floor_rounds = [r for r in alloc.rounds if r.get("floor")]
    assert len(floor_rounds) == 1 and floor_rounds[0]["measured_ms"] == pytest.approx(floor_ms)
    assert any(r.get("narrow") for r in alloc.rounds)
    again = allocate_latency(model, x, target, table=table, measure=runtime)
    assert again.widths == alloc.widths and again.rounds == alloc.rounds  # deterministic given the measurements


def floors_of(channels):
    from jointcompress.latency_targets import floors

    return floors(channels)


class _Cat(torch.nn.Module):
    """Two branches concatenated into one conv."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(1, 24, 3, padding=1)
        self.b = torch.nn.Conv2d(1, 24, 5, padding=2)
        self.c = torch.nn.Conv2d(48, 64, 3, padding=1)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(torch.relu(self.c(x)).amax((2, 3)))


def test_a_layer_fed_by_a_concatenation_counts_every_groups_channels():
    """conv c reads torch.cat(a, b): its input width is a's kept channels plus b's (it was scaled by one
    group alone: 48 or 16 where the shrunk model has 32)."""
    from jointcompress.latency_targets import input_grid, site_widths

    torch.manual_seed(0)
    model, x = _Cat().eval(), torch.randn(1, 1, 8, 8)
    groups, _ = discover_groups(model, x)
    channels = {g.name: g.channels for g in groups}
    sites = layer_sites(model, x, groups)
    assert sites["c"].in_groups == {"a": 24, "b": 24}
    for w in ({"a": 24, "b": 8, "c": 64}, {"a": 8, "b": 24, "c": 64}, {"a": 8, "b": 16, "c": 32}):
        real = shrunk_to(model, x, w).c
        assert site_widths(sites["c"], w, channels) == (real.in_channels, real.out_channels)
    grid = input_grid(sites["c"], channels)
    assert grid[0] == 16 and grid[-1] == 48 and grid == sorted(set(grid))


def test_no_prunable_group_says_no_channel_can_be_removed():
    """A model whose only hidden channels sit under a GroupNorm has no group to narrow: the error says so
    at once, not "every group at 5%... Only 0 channel group(s) can narrow ()"."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.GroupNorm(4, 16), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10)).eval()
    x = torch.randn(2, 1, 8, 8)
    assert discover_groups(model, x)[0] == []
    with pytest.raises(TargetError, match=r"no channel can be removed from this model.*jointcompress dry-run.*"
                                          r"measured at 1\.000 ms") as err:
        allocate_latency(model, x, Target(latency_ms=0.5, batch=1), table=LatencyTable({}, 1.0), measure=lambda m: 1.0)
    assert "Only 0" not in str(err.value) and "5%" not in str(err.value)


def test_the_floor_in_the_message_is_the_computed_one():
    """A 512-channel group's floor is 32 (5% is 26 channels, on the 16-channel kernel step), not "5%, at least 8"."""
    from jointcompress.latency_targets import unreachable

    channels = {"wide": 512, "narrow": 20}
    assert floors_of(channels) == {"wide": 32, "narrow": 8}
    msg = str(unreachable(Target(latency_ms=1.0, batch=4), LatencyTable({}), {}, channels, 0.05, measured_ms=2.0))
    assert "narrow 8 of 20, wide 32 of 512" in msg and "kernel step" in msg and "measured at 2.000 ms" in msg


@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_a_table_with_an_offset_does_not_cut_far_under_the_target(lenet, fraction):
    """Each layer timed alone reads high by a constant (small layers' caches go cold): re-aiming by
    predicted / measured then jumps from the uncompressed model (over) to one near the floor (a 1.5x
    target measured 3.8x faster, every group at its floor). The goal is bisected between the two and
    the model widened, measured, so it lands near the aim, still under it."""
    model, x = lenet
    true, sites, channels = mac_table(model, x)
    full = true.predict(sites, channels, channels)
    high = LatencyTable({n: {**t, "ms": [[v + full / 3 for v in row] for row in t["ms"]]} for n, t in true.layers.items()},
                        true.constant_ms)
    target = Target(latency_ms=fraction * full)
    alloc = allocate_latency(model, x, target, table=high, measure=_true_runtime(true, sites, channels, x), margin=0.05)
    assert alloc.measured_ms == pytest.approx(true.predict(sites, alloc.widths, channels))
    assert 0.8 * target.latency_ms <= alloc.measured_ms <= 0.95 * target.latency_ms
    assert any(r.get("bisect") or r.get("widen") for r in alloc.rounds)


def test_a_latency_ms_target_refused_on_a_busy_machine_says_the_machine_is_busy(lenet, monkeypatch):
    """The narrowest model measured slower than the dense one had moments before (load), and the message only
    said to raise target.latency_ms; the speedup form already named the load."""
    import os

    from jointcompress.latency_targets import floors, unreachable

    model, x = lenet
    table, sites, channels = mac_table(model, x)
    target = Target(latency_ms=0.01, batch=1)
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * (os.cpu_count() or 1), 0.0, 0.0))
    busy = str(unreachable(target, table, sites, channels, 0.05, measured_ms=1.0))
    assert "This machine is busy (load average" in busy and "raise target.latency_ms" in busy
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    quiet = str(unreachable(target, table, sites, channels, 0.05, measured_ms=1.0))
    assert "busy" not in quiet and "Raise target.latency_ms" in quiet and floors(channels)


def test_a_target_the_narrowest_model_misses_is_refused_on_the_untrained_model():
    """A model's speed does not depend on its weights: the narrowest model allowed is timed before training, and a
    target it misses is refused naming the measurement; one it meets is not (timed, but no time is asserted: a
    microsecond target no model meets, a minute one every model does)."""
    from jointcompress.latency_targets import refusal_before_training
    from jointcompress.models import LeNet5
    from jointcompress.recipe import parse_recipe
    from jointcompress.targets import TargetError

    example = torch.randn(2, 1, 28, 28)
    recipe = lambda target: parse_recipe({"target": target, "techniques": [{"type": "prune_structured"}]})  # noqa: E731
    refusal = refusal_before_training(LeNet5(), recipe({"latency_ms": 0.0001, "batch": 1}), example)
    assert isinstance(refusal, TargetError) and "narrowest model allowed" in str(refusal)
    assert "measured at" in str(refusal) and "conv1 8 of 20" in str(refusal), refusal
    assert refusal_before_training(LeNet5(), recipe({"latency_ms": 60_000, "batch": 1}), example) is None
    assert refusal_before_training(LeNet5(), recipe({"speedup": 10_000, "batch": 1}), example) is not None


def test_a_table_that_reads_high_throughout_does_not_cut_far_under_the_target(lenet):
    """A table three times the runtime (no round measures over the aim): the rounds stopped at their first model,
    a third of the aim, and the give-back bisection needed a model measured over it, so none ran (a speed-up target
    ran far faster than asked, and lost accuracy for it). The uncompressed model is the upper end of the bisection."""
    model, x = lenet
    true, sites, channels = mac_table(model, x)
    full = true.predict(sites, channels, channels)
    high = LatencyTable({n: {**t, "ms": [[3 * v for v in row] for row in t["ms"]]} for n, t in true.layers.items()},
                        3 * true.constant_ms)
    target = Target(latency_ms=0.5 * full)
    alloc = allocate_latency(model, x, target, table=high, measure=_true_runtime(true, sites, channels, x), margin=0.05)
    first = next(r for r in alloc.rounds if r.get("goal_ms") is not None)
    assert first["measured_ms"] < 0.5 * 0.95 * target.latency_ms  # the rounds' model: far under the aim
    assert any(r.get("bisect") for r in alloc.rounds)
    assert 0.85 * 0.95 * target.latency_ms <= alloc.measured_ms <= 0.95 * target.latency_ms


def test_a_speedup_met_by_the_uncompressed_widths_is_never_met(lenet, monkeypatch):
    """The uncompressed model timed slow once (load) made its time / 1.5 a goal the same model met: every channel
    kept, and the run said the target was met. The allocation reads the uncompressed model again and allocates from the
    faster reading; a verdict between models of the same widths is not met, said why (no time is asserted)."""
    import copy

    import jointcompress.latency_targets as lt
    from jointcompress.latency_targets import LatencyAllocation, latency_against_target, resolve_latency

    model, x = lenet
    channels = {g.name: g.channels for g in discover_groups(model, x)[0]}
    goals = []

    def allocate(base, example, target, **kwargs):  # keeps every channel for a goal over 1 ms, else halves them
        goals.append(target.latency_ms)
        widths = dict(channels) if target.latency_ms > 1.0 else {g: c // 2 for g, c in channels.items()}
        return LatencyAllocation(widths, dict(channels), target.latency_ms, target.latency_ms, target.latency_ms)

    monkeypatch.setattr(lt, "allocate_latency", allocate)
    readings = iter([3.0, 1.2])  # the uncompressed model: slow under load, then as it is
    recipe = resolve_latency(model, {"techniques": []}, x, Target(speedup=1.5, batch=1),
                             measure_dense=lambda m: next(readings))
    assert goals == [2.0, pytest.approx(0.8)] and recipe.technique("prune_structured") is not None
    r = latency_against_target(model, copy.deepcopy(model), x, Target(speedup=1.5, batch=1), rounds=3)
    assert r["met"] is False and "the machine's load, not the model" in r["note"]


def test_a_latency_target_at_a_batch_the_model_cannot_run_is_named():
    """A model sized for 64 rows, timed at batch 128: torch's "size of tensor a (128) must match" traceback."""
    from jointcompress.latency_targets import refusal_before_training
    from jointcompress.recipe import parse_recipe

    class AtMost64(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 16)
            self.out = torch.nn.Linear(16, 2)
            self.register_buffer("rows", torch.zeros(64, 1))

        def forward(self, x):
            return self.out(torch.relu(self.fc(x)) + self.rows[: len(x)])

    recipe = parse_recipe({"target": {"latency_ms": 5.0, "batch": 128}, "techniques": [{"type": "prune_structured"}]})
    with pytest.raises(TargetError, match=r"target.batch: 128: the model cannot run a batch of 128 rows \(RuntimeError"):
        refusal_before_training(AtMost64(), recipe, torch.randn(2, 8))


def test_an_allocation_at_the_floor_is_confirmed_as_the_final_check_times_it(lenet, monkeypatch):
    """A ResNet at batch 1: the probes, timed alone, read every group at its floor under the target; the finished model,
    timed interleaved with the uncompressed one, missed it, after training the narrowest model at a great cost in
    accuracy. Such an allocation is now timed the final check's way first, and refused before training where it
    misses there (the timings are stand-ins: no time is asserted)."""
    import jointcompress.latency_targets as lt
    from jointcompress.latency_targets import LatencyAllocation, floors, resolve_latency

    model, x = lenet
    channels = {g.name: g.channels for g in discover_groups(model, x)[0]}
    at_floor = LatencyAllocation(floors(channels), dict(channels), 0.5, 0.8, measured_ms=0.55)
    monkeypatch.setattr(lt, "allocate_latency", lambda *a, **k: at_floor)
    readings = {"met": False}

    def verdict(uncompressed, compressed, example, target, **_):
        widths = {g.name: g.channels for g in discover_groups(compressed, example)[0]}
        assert widths == floors(channels)  # the narrowest model is what is timed
        return {"interleaved_ms": {"uncompressed": 1.2, "compressed": 1.05}, "goal_ms": 0.8, "met": readings["met"]}

    monkeypatch.setattr(lt, "latency_against_target", verdict)
    with pytest.raises(TargetError, match=r"target.latency_ms: 0.8 ms at batch 1 cannot be met .* measured 1.050 ms "
                                          r"interleaved .* the allocator's probe, timed alone, read 0.550 ms"):
        resolve_latency(model, {"techniques": []}, x, Target(latency_ms=0.8, batch=1))
    readings["met"] = True
    assert resolve_latency(model, {"techniques": []}, x, Target(latency_ms=0.8, batch=1)).technique("prune_structured")
    monkeypatch.setattr(lt, "latency_against_target", lambda *a, **k: pytest.fail("an allocation above the floor is "
                                                                                  "not timed again"))
    wider = LatencyAllocation(dict(channels), dict(channels), 0.5, 0.8, measured_ms=0.55)
    monkeypatch.setattr(lt, "allocate_latency", lambda *a, **k: wider)
    resolve_latency(model, {"techniques": []}, x, Target(latency_ms=0.8, batch=1))


def test_a_latency_target_batch_past_the_machines_memory_is_refused_before_the_model_runs_it(monkeypatch):
    """`batch: 100000` on LeNet-5 passed the recipe's checks, and `recipe validate` was then killed for memory, no
    message: one forward there holds about 11 GiB."""
    import jointcompress.batch_memory as bm
    from jointcompress.batch_memory import bytes_per_row, check_batch_fits
    from jointcompress.latency_targets import refusal_before_training
    from jointcompress.recipe import parse_recipe

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(256, 10))
    x = torch.randn(2, 1, 8, 8)
    # the convolution holds its input (64), output (4 x 64) and unfolded columns (1 x 3 x 3 x 64), fp32
    assert bytes_per_row(net, x) == (64 + 256 + 576) * 4
    check_batch_fits(net, x, 100, available=10**6)  # 2 x 100 x 3,584 B fit in 1 MB
    with pytest.raises(TargetError, match=r"target.batch: 200: .*about 1.4 MiB .*1.0 MiB available; .*at most about 139 rows fit here"):
        check_batch_fits(net, x, 200, available=10**6)
    rows = []
    net.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    monkeypatch.setattr(bm, "available_bytes", lambda: 10**6)
    recipe = parse_recipe({"target": {"latency_ms": 5.0, "batch": 100000}, "techniques": [{"type": "prune_structured"}]})
    with pytest.raises(TargetError, match=r"target.batch: 100000: timing the model at 100000 rows needs about 683.6 MiB"):
        refusal_before_training(net, recipe, x)
    assert rows and max(rows) == 1  # only the estimate's forward ran


def test_a_latency_target_the_uncut_model_meets_is_said(lenet, monkeypatch):
    """latency_ms: 100000 kept every channel and printed "met" at 1.02x, with no word that the target asked for
    nothing (fake table and runtime)."""
    from jointcompress import latency_targets as lt

    model, x = lenet
    table, sites, channels, _ = _faked_timing(lt, model, x, monkeypatch)
    loose = 10 * table.predict(sites, channels, channels)
    data = {"model": "lenet5", "techniques": [{"type": "prune_structured"}, {"type": "distill_kd"}]}
    with pytest.warns(UserWarning, match=r"target.latency_ms: .* at batch 1: the model with every channel kept measured "
                                         r".* ms, within the target, so no channel is removed"):
        recipe = lt.resolve_latency(model, data, x, Target(latency_ms=loose, batch=1))
    assert recipe._resolution["widths"] == recipe._resolution["channels"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a target that cuts says nothing of the kind
        lt.resolve_latency(model, data, x, Target(latency_ms=0.3 * loose / 10, batch=1))


def test_the_latency_tables_timing_is_said_as_it_goes(caplog, capsys):
    """Minutes of per-layer timing before a ResNet-18's first step were said by one line, then nothing: each layer
    timed is now an INFO record of the package's logger, which the command line prints."""
    import logging

    from jointcompress import latency_targets as lt
    from jointcompress.cli import _records_said

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    with caplog.at_level(logging.INFO, logger="jointcompress.latency"):
        lt.measure_table(model, torch.randn(2, 16), batch=4, rounds=2)
    said = [r.getMessage() for r in caplog.records if r.name == "jointcompress.latency"]
    assert any(m.startswith("latency table: 1 of ") and "to go" in m for m in said), said
    assert said[-1].startswith("latency table: ") and "layers timed" in said[-1], said
    with _records_said():
        logging.getLogger("jointcompress.latency").info("latency table: 3 of 9 layers timed")
    assert "latency table: 3 of 9 layers timed" in capsys.readouterr().out
    logging.getLogger("jointcompress.latency").info("not printed outside a command")
    assert "not printed" not in capsys.readouterr().out


def test_a_speedup_target_missed_on_two_readings_is_refused_only_if_missed_side_by_side(monkeypatch):
    """A 1.5x target was refused as out of reach on a busy machine ("the narrowest model is 1.29x as fast"): its
    milliseconds came from the uncompressed model timed a while before the narrowest one, under another load; the
    two timed side by side read 1.87x. A speed-up the readings apart miss is now refused only where the two models
    timed interleaved (as the run's final check times them) miss it too. (Fake timings: logic only.)"""
    from jointcompress import latency_targets as lt
    from jointcompress.models import LeNet5
    from jointcompress.recipe import parse_recipe
    from jointcompress.targets import TargetError

    example = torch.randn(2, 1, 28, 28)
    recipe = parse_recipe({"target": {"speedup": 1.5, "batch": 1}, "techniques": [{"type": "prune_structured"}]})
    readings = iter([24.0, 25.0])  # the narrowest model, then the uncompressed one: 1.04x, apart
    monkeypatch.setattr(lt, "timed_ms", lambda *a, **k: next(readings))
    side_by_side = []

    def pair(uncompressed, compressed, example_inputs, target, **_):
        side_by_side.append(target.speedup)
        ms = {"uncompressed": 24.0, "compressed": 24.0 / met_at}
        return {"goal_ms": ms["uncompressed"] / target.speedup, "interleaved_ms": ms, "speedup": met_at,
                "met": met_at >= target.speedup}

    monkeypatch.setattr(lt, "latency_against_target", pair)
    met_at = 1.87
    assert lt.refusal_before_training(LeNet5(), recipe, example) is None and side_by_side == [1.5]
    readings, met_at = iter([24.0, 25.0]), 1.3
    refusal = lt.refusal_before_training(LeNet5(), recipe, example)
    assert isinstance(refusal, TargetError) and "missed it timed side by side with it too" in str(refusal), refusal
    # the allocator's own floor check: the same rule, and a latency_ms target never asks for the pair
    log = []
    assert not lt._speedup_met_side_by_side(LeNet5(), LeNet5(), example, Target(latency_ms=1.0), log) and not log
    met_at = 2.0
    assert lt._speedup_met_side_by_side(LeNet5(), LeNet5(), example, Target(speedup=1.5, batch=1), log)
    assert log[-1]["side_by_side"] and log[-1]["met"] and len(side_by_side) == 3
    assert lt._speedup_met_side_by_side(LeNet5(), LeNet5(), example, Target(speedup=1.5, batch=1), log)
    assert len(side_by_side) == 3  # read once a run: the first reading that met it stands


def test_a_latency_target_on_a_model_without_channel_groups_is_refused_as_the_targets():
    """A model with no channel group to remove, under a latency target, was refused as prune_structured's ("no
    prunable channel group matches targets ['*']"), a technique the recipe never named: the target adds it."""
    from jointcompress.cli import _refuse_before_training
    from jointcompress.data import load_dataset
    from jointcompress.recipe import parse_recipe
    from jointcompress.targets import TargetError
    from jointcompress.techniques.prune_structured import NoChannelGroupError

    split = load_dataset("digits")
    builder = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # noqa: E731  (the output layer alone)
    asked = {"target": {"speedup": 1.5, "batch": 64}, "training": {"epochs": 1},
             "techniques": [{"type": "quant_lsq", "bits": 8}, {"type": "distill_kd"}]}
    with pytest.raises(TargetError, match=r"target.speedup: 1.5x at batch 64 cannot be met: a latency target removes "
                                          r"channels, and this model has no channel group that may lose any \(1: its "
                                          r"output is the model output"):
        _refuse_before_training(builder, parse_recipe(asked), split, timed=False)
    named = {**asked, "techniques": [{"type": "prune_structured"}, *asked["techniques"]]}  # the user's own: its words
    with pytest.raises(NoChannelGroupError, match=r"prune_structured: no prunable channel group"):
        _refuse_before_training(builder, parse_recipe(named), split, timed=False)


def test_a_target_within_the_timing_slack_is_let_through_with_a_word(monkeypatch):
    """recipe validate said ok to a speed-up the narrowest model missed by under the 1.25x slack a busy machine's
    timing may add, and compress refused it after training the teacher: it is still let through, and said."""
    from jointcompress import latency_targets as lt
    from jointcompress.models import LeNet5
    from jointcompress.recipe import parse_recipe

    example = torch.randn(2, 1, 28, 28)
    recipe = parse_recipe({"target": {"speedup": 1.5, "batch": 1}, "techniques": [{"type": "prune_structured"}]})
    readings = iter([22.0, 30.0])  # the narrowest model, then the uncompressed one: its goal is 20 ms
    monkeypatch.setattr(lt, "timed_ms", lambda *a, **k: next(readings))
    monkeypatch.setattr(lt, "latency_against_target", lambda *a, **k: {
        "goal_ms": 20.0, "interleaved_ms": {"uncompressed": 30.0, "compressed": 22.0}, "speedup": 30 / 22, "met": False})
    with pytest.warns(UserWarning, match=r"narrowest model allowed measured 22.000 ms, over the target's 20.000 ms but "
                                         r"within the 1.25x .*refuses the target then"):
        assert lt.refusal_before_training(LeNet5(), recipe, example) is None

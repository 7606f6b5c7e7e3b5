"""A latency target out of reach: channels the last cuts would remove for less than `tolerance`
of speed are given back (latency_knee), where they regain the most importance; reachable
targets are untouched; a flat table gives nothing back; `narrow` does not cut under them.
Fake tables and fake runtimes only (no timing in tests)."""
import pytest
import torch

from jointcompress.graph import discover_groups
from jointcompress.latency_knee import give_back_within
from jointcompress.latency_targets import (LatencyAllocation, LatencyTable, allocate_latency, allowed_widths, floors,
                                           layer_sites, narrow)
from jointcompress.models import build_model
from jointcompress.recipe import Target
from test_latency_targets import _widths, mac_table


class Weighted:
    """An importance where a channel of `group` is worth `weight` and any other channel 1."""

    def __init__(self, group: str, weight: float):
        self.group, self.weight = group, weight

    def lost(self, group, wide, narrow):
        return (wide - narrow) * (self.weight if group == self.group else 1.0)


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    model, x = build_model("lenet5").eval(), torch.randn(2, 1, 28, 28)
    table, sites, channels = mac_table(model, x)
    return model, x, table, sites, channels


def _options(channels):
    return {g: allowed_widths(c) for g, c in channels.items()}


def test_give_back_stays_within_tolerance_and_goes_where_importance_is(lenet):
    model, x, table, sites, channels = lenet
    low = floors(channels)
    base = table.predict(sites, low, channels)
    # on this table fc1's next step costs +0.8%, conv1's and conv2's about +40% each
    for heavy, tol in (("fc1", 0.05), ("conv2", 0.45), ("conv1", 0.45)):
        widths, predicted = give_back_within(table, sites, channels, Weighted(heavy, 1000.0), low, _options(channels), tol)
        assert predicted == pytest.approx(table.predict(sites, widths, channels))
        assert base < predicted <= (1 + tol) * base
        assert all(widths[g] >= low[g] and widths[g] in allowed_widths(channels[g]) for g in channels)
        assert widths[heavy] > low[heavy]  # the important group got channels back first
        assert all(widths[g] == low[g] for g in ("conv1", "conv2") if g != heavy)  # no room left for the other
    off, same = give_back_within(table, sites, channels, Weighted("fc1", 100.0), low, _options(channels), 0.0)
    assert off == low and same == base


def test_flat_table_gives_nothing_back(lenet):
    model, x, _, sites, channels = lenet
    flat = LatencyTable({n: {"cin": [s.cin], "cout": [s.cout], "ms": [[1.0]]} for n, s in sites.items()}, 0.5)
    widths, _ = give_back_within(flat, sites, channels, Weighted("fc1", 100.0), floors(channels), _options(channels))
    assert widths == floors(channels)


def test_out_of_reach_target_keeps_cheap_channels_and_narrow_respects_them(lenet):
    """A target under the floors' prediction: the allocation misses it either way, but with a
    tolerance it keeps channels that cost at most 5% of speed; narrow then leaves them."""
    model, x, table, sites, channels = lenet
    fake_ms = lambda m: table.predict(sites, dict(zip(channels, _widths(m, x))), channels)  # noqa: E731
    floor_ms = table.predict(sites, floors(channels), channels)
    target = Target(latency_ms=0.5 * floor_ms)
    imp = Weighted("fc1", 100.0)
    plain = allocate_latency(model, x, target, table=table, measure=fake_ms, calibrate=True, importance=imp, tolerance=0)
    kept = allocate_latency(model, x, target, table=table, measure=fake_ms, calibrate=True, importance=imp)
    assert plain.widths == floors(channels) and plain.met is False and kept.met is False
    assert kept.least == kept.widths and kept.widths["fc1"] > plain.widths["fc1"]
    assert floor_ms < kept.measured_ms <= 1.05 * floor_ms
    assert any(r.get("gave_back") for r in kept.rounds) and kept.to_dict()["least"] == kept.widths
    cut = narrow(model, x, kept, fake_ms, max_trials=50, importance=imp)
    assert cut.widths == kept.widths and cut.met is False
    freed = narrow(model, x, LatencyAllocation(dict(kept.widths), channels, 1.0, target.latency_ms, kept.measured_ms),
                   fake_ms, max_trials=50, importance=imp)
    assert freed.widths == floors(channels)  # without `least`, the measured cuts go to the floors


@pytest.mark.parametrize("fraction", [0.6, 0.3, 0.15])
def test_reachable_targets_are_untouched(lenet, fraction):
    model, x, table, sites, channels = lenet
    target = Target(latency_ms=fraction * table.predict(sites, channels, channels))
    with_tol = allocate_latency(model, x, target, table=table, measure=False)
    without = allocate_latency(model, x, target, table=table, measure=False, tolerance=0)
    assert with_tol.widths == without.widths and with_tol.least is None

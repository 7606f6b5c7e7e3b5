"""The kernels called without TorchDynamo (techniques/traced_kernel.py): one graph for every size
of a layout, the same values as eager, and no silent result where the graph's assumptions fail."""
import pytest
import torch

from jointcompress.techniques.traced_kernel import KernelUnavailable, TracedKernel


def scaled_rows(w, s, bias):
    """Per-row scaling, a per-row sum and an optional bias: the shape of the quantizer's kernels."""
    out = torch.round(w / s) * s
    if bias is not None:
        out = out + bias
    return out, (out * w).sum(dim=1, keepdim=True)


def total(w):
    return (w * w).sum()


def _args(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g), torch.rand(rows, 1, generator=g) + 0.1


def test_one_graph_serves_every_size_and_matches_eager():
    kernel = TracedKernel(scaled_rows)
    for rows, cols in ((30, 50), (7, 130), (64, 64), (2, 3)):  # equal sizes by chance are still two symbols
        w, s = _args(rows, cols)
        out, sums = kernel(w, s, None)
        want_out, want_sums = scaled_rows(w, s, None)
        assert torch.equal(out, want_out)  # element-wise IEEE operations: bit for bit
        torch.testing.assert_close(sums, want_sums, rtol=1e-6, atol=1e-6)
    assert [len(v) for v in kernel._variants.values()] == [1]


def test_a_size_of_one_gets_its_own_graph_and_none_is_part_of_the_layout():
    kernel = TracedKernel(scaled_rows)
    w, s = _args(1, 40)
    bias = torch.randn(1, 40)
    for b in (None, bias):
        out, _ = kernel(w, s, b)
        assert torch.equal(out, scaled_rows(w, s, b)[0])
    w, s = _args(9, 40)
    assert torch.equal(kernel(w, s, None)[0], scaled_rows(w, s, None)[0])
    assert sorted(len(v) for v in kernel._variants.values()) == [1, 2]  # rows = 1 traced apart from rows = 9


def test_a_single_output_and_a_transposed_argument():
    kernel = TracedKernel(total)
    w = torch.randn(20, 30)
    assert isinstance(kernel(w), torch.Tensor)
    torch.testing.assert_close(kernel(w.t()), total(w.t()))  # made contiguous first


def test_arguments_that_break_the_graphs_assumptions_are_refused_not_computed():
    kernel = TracedKernel(scaled_rows)
    w, s = _args(30, 50)
    kernel(w, s, None)
    wrong_s = torch.rand(31, 1) + 0.1  # 31 rows of steps for 30 rows of weights: eager refuses to broadcast
    with pytest.raises(KernelUnavailable):
        kernel(w, wrong_s, None)
    with pytest.raises(KernelUnavailable):  # remembered as failed: not traced again
        kernel(w, wrong_s, None)
    assert torch.equal(kernel(w, s, None)[0], scaled_rows(w, s, None)[0])  # the layout itself still runs

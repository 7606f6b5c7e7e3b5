"""The pooled-convolution rewrite is exact, applies only where it fits and pays, and the ORT
deployment serves each batch size from the graph meant for it."""
import collections

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jointcompress.deploy.pooled_conv import folded_kernel, folding_pays, rewrite_pooled_convs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


class Pruned(nn.Module):
    """A LeNet-5 shape at pruned widths (conv1 c1, conv2 c2), with an optional padded stem."""

    def __init__(self, c1=4, c2=16, pad=0):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 5, padding=pad)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        side = ((28 + 2 * pad - 4) // 2 - 4) // 2
        self.fc = nn.Linear(c2 * side * side, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def _export(model, path, opset=17):
    torch.onnx.export(model.eval(), (torch.randn(2, 1, 28, 28),), str(path), dynamo=False, opset_version=opset,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def _run(path, x):
    from jointcompress.deploy.timing import ort_session

    return ort_session(path).run(None, {"input": x.numpy()})[0]


def _ops(model_proto):
    return collections.Counter(n.op_type for n in model_proto.graph.node)


def test_folding_pays_only_where_padding_wastes_the_block():
    assert folding_pays(4, (5, 5), 16) and folding_pays(8, (5, 5), 16)  # 0.36x, 0.72x of the padded work
    assert not folding_pays(12, (5, 5), 16) and not folding_pays(16, (5, 5), 16)  # 1.08x, 1.44x
    assert folding_pays(4, (5, 5), 8) and not folding_pays(8, (5, 5), 8)


def test_folded_kernel_is_the_pooled_phases_of_the_convolution():
    """The folded convolution over SpaceToDepth(x) gives, in channel block p = 2a + b, the
    original convolution's output at rows 2i + a, columns 2j + b."""
    torch.manual_seed(0)
    w, x = torch.randn(3, 2, 5, 5), torch.randn(1, 2, 12, 12)
    full = F.conv2d(x, w)  # 8 x 8
    folded = F.conv2d(F.pixel_unshuffle(x, 2).view(1, 2, 4, 6, 6).transpose(1, 2).reshape(1, 8, 6, 6),
                      torch.from_numpy(folded_kernel(w.numpy())))  # SpaceToDepth's (dh, dw, c) channel order
    for a in (0, 1):
        for b in (0, 1):
            p = 2 * a + b
            assert torch.allclose(folded[:, 3 * p:3 * p + 3], full[:, :, a::2, b::2], atol=1e-5)


@pytest.mark.parametrize("opset", [17, 18])
def test_rewrite_is_exact_and_folds_only_the_narrow_stem(tmp_path, opset):
    import onnx

    torch.manual_seed(0)
    model = Pruned(4, 16).eval()
    path = _export(model, tmp_path / "m.onnx", opset)
    graph = onnx.load(str(path))
    folded = rewrite_pooled_convs(graph, block=16)
    assert len(folded) == 1  # conv1 (4 filters) folds; conv2 (16 filters) would do more work
    ops = _ops(graph)
    assert ops["SpaceToDepth"] == 1 and ops["ReduceMax"] == 1 and ops["MaxPool"] == 1 and ops["Conv"] == 2
    onnx.checker.check_model(graph)
    out = tmp_path / "folded.onnx"
    onnx.save(graph, str(out))
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(_run(out, x) - ref).max() < 1e-4
    assert np.abs(_run(out, x[:1]) - ref[:1]).max() < 1e-4  # dynamic batch kept


def test_rewrite_leaves_what_does_not_fit(tmp_path):
    import onnx

    graph = onnx.load(str(_export(Pruned(4, 16, pad=2), tmp_path / "m.onnx")))  # padded stem: not exact as folded
    assert rewrite_pooled_convs(graph, block=16) == []
    graph = onnx.load(str(_export(Pruned(16, 16), tmp_path / "w.onnx")))  # 16 filters: folding costs more
    assert rewrite_pooled_convs(graph, block=16) == []
    assert _ops(graph)["SpaceToDepth"] == 0


def test_deployment_routes_batches_and_records_its_runtime(tmp_path):
    from jointcompress.deploy.ort_deploy import deploy_fp32
    from jointcompress.deploy.timing import session_threads

    torch.manual_seed(0)
    model = Pruned(4, 8).eval()
    dep = deploy_fp32(model, tmp_path / "m.onnx", torch.randn(2, 1, 28, 28), threads=1, block=16)
    assert dep.folded is not None and dep.folded.is_file() and len(dep.folded_convs) == 2
    assert dep.graph_for(1) == dep.plain and dep.graph_for(7) == dep.plain and dep.graph_for(64) == dep.folded
    run = dep.predict()
    assert session_threads(run.session)["intra_op"] == 1
    assert run.runtime["threads"] == 1 and run.runtime["spinning"] == "off" and "folded" in run.runtime["batch >= 8"]
    for n in (1, 64):
        x = torch.randn(n, 1, 28, 28)
        with torch.no_grad():
            assert torch.allclose(run(x), model(x), atol=1e-4)
    plain = deploy_fp32(Pruned(16, 16).eval(), tmp_path / "w.onnx", torch.randn(2, 1, 28, 28), block=16)
    assert plain.folded is None and plain.graph_for(64) == plain.plain

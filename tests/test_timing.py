"""deploy.timing: every ORT session is made with the requested threads and spinning off, and the
timing helper returns the fields it documents (no real timing is asserted)."""
import os

import torch

from jointcompress.bench import bench
from jointcompress.deploy.int8 import quantize_int8
from jointcompress.deploy.onnx_export import export_onnx, ort_predict, ort_session
from jointcompress.deploy.timing import Timing, describe, flagged, session_threads, time_contenders
from jointcompress.hf.int8 import interleaved_latency as hf_interleaved_latency
from jointcompress.models import build_model
from jointcompress.pipeline import measure_latency


def _onnx(tmp_path):
    model = build_model("lenet5").eval()
    x = torch.randn(2, 1, 28, 28)
    return model, x, export_onnx(model, tmp_path / "m.onnx", x)


def test_ort_session_has_requested_threads_and_spinning_off(tmp_path):
    _, _, path = _onnx(tmp_path)
    for threads in (1, 2):
        got = session_threads(ort_session(path, threads))
        assert got == {"intra_op": threads, "inter_op": 1, "session.intra_op.allow_spinning": "0",
                       "session.inter_op.allow_spinning": "0"}


def test_int8_model_sessions_come_from_the_factory(tmp_path):
    model, x, _ = _onnx(tmp_path)
    q = quantize_int8(model, None, torch.randn(16, 1, 28, 28), x, workdir=tmp_path, threads=2)
    assert session_threads(q.predict.session)["intra_op"] == 2
    again = q.with_threads(1)
    assert session_threads(again.predict.session)["intra_op"] == 1
    assert session_threads(again.predict.session)["session.intra_op.allow_spinning"] == "0"
    assert torch.allclose(again(x), q(x))


def test_time_contenders_returns_documented_fields(tmp_path):
    model, x, path = _onnx(tmp_path)
    calls = {"torch": 0, "ort": 0}
    ort = ort_predict(ort_session(path, 1))

    def run(name, fn):
        calls[name] += 1
        return fn(x)

    before = torch.get_num_threads()
    t = time_contenders({"torch": lambda: run("torch", model), "ort": lambda: run("ort", ort)},
                        threads=1, rounds=4, warmup=2, alone_runs=3)
    assert isinstance(t, Timing) and t.threads == 1 and t.rounds == 4
    assert set(t.interleaved_ms) == set(t.alone_ms) == {"torch", "ort"}
    assert all(v > 0 for v in t.interleaved_ms.values()) and all(v > 0 for v in t.alone_ms.values())
    assert set(t.flagged) <= {"torch", "ort"}
    # warm-up twice, 4 interleaved rounds, then alone: 1 warm-up + 3 runs
    assert calls == {"torch": 2 + 4 + 1 + 3, "ort": 2 + 4 + 1 + 3}
    assert torch.get_num_threads() == before  # restored
    d = t.to_dict()
    assert {"threads", "interleaved_ms", "alone_ms", "flagged", "tolerance", "method"} <= set(d)
    assert "1 thread" in describe(t)
    assert t.speedup("torch")["torch"] == 1.0
    # the processor the times were taken on is recorded with them, and said
    machine = d["machine"]
    assert machine["cores"] == os.cpu_count() and machine["vector_isa"] == torch.backends.cpu.get_cpu_capability()
    assert machine["cpu"] and machine["cpu"] in describe(t) and machine["vector_isa"] in describe(t)
    assert Timing(**d).machine == machine  # a stored result read back keeps its own machine
    assert machine["cpu"] not in describe(Timing(**{**d, "machine": None}))  # an old result without one names none


def test_flag_when_interleaved_and_alone_disagree():
    # a contender that is slow only while interleaved: every call after the other contender sleeps
    import time

    state = {"last": None}

    def a():
        if state["last"] == "b":
            time.sleep(0.004)
        state["last"] = "a"

    def b():
        state["last"] = "b"

    t = time_contenders({"a": a, "b": b}, rounds=6, warmup=1, alone_runs=4)
    assert "a" in t.flagged  # ~4 ms interleaved vs microseconds alone
    assert flagged({"x": 1.25, "y": 1.1, "z": 0.7}, {"x": 1.0, "y": 1.0, "z": 1.0}, 0.2) == ["x", "z"]


def test_latency_paths_record_threads(tmp_path):
    model = build_model("lenet5").eval()
    x = torch.randn(4, 1, 28, 28)
    rows = measure_latency({"a": model, "b": model}, x, runs=2, threads=1)
    assert rows["a"]["latency_threads"] == 1 and rows["a"]["latency_ms_b64"] > 0
    res = bench(model, model, x, runs=2, batch_sizes=(1,), threads=1)
    assert res["threads"] == 1 and res["timing"]["b1"]["threads"] == 1 and "latency_flagged" in res


def test_hf_interleaved_latency_fields():
    fn = lambda ids, mask: ids.float().sum()  # noqa: E731
    res = hf_interleaved_latency({"x": (fn, 50), "y": (fn, 50)}, seq_len=8, rounds=1, threads=1)
    for name in ("x", "y"):
        assert {"batch1_ms", "batch32_ms", "batch1_alone_ms", "batch32_alone_ms"} <= set(res[name])
    assert isinstance(res["flagged"], list)


def test_a_contender_whose_session_has_other_threads_or_spins_is_refused(tmp_path):
    """The timing recorded `threads` for every contender while an ONNX Runtime one ran with its own count (or a
    default session's: one thread per core, spinning): the speed-up read from it was not like for like."""
    import onnxruntime as ort
    import pytest

    model, x, path = _onnx(tmp_path)
    default = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session_threads(default)["session.intra_op.allow_spinning"] is None  # never set: ORT spins
    for session, said in ((ort_session(path, 2), "with 2 intra-op thread"),
                          (default, r"with its default threads \(one per core\) and spinning on")):
        with pytest.raises(ValueError, match=rf"'after' runs an ONNX Runtime session {said}.*ort_session\(path, threads=1\)"):
            bench(model, ort_predict(session), x, runs=2, threads=1)
    assert bench(model, ort_predict(ort_session(path, 1)), x, runs=2, threads=1)["threads"] == 1


def test_the_against_comparison_and_the_latency_verdict_record_the_processor():
    """docs/latency.md: every timing records the processor it was taken on. bench --against kept a few fields of
    each timing and dropped `machine`; the latency target's verdict (summary.json and its line) had none either."""
    from types import SimpleNamespace

    from jointcompress.cli import _latency_line
    from jointcompress.deploy.against import BASELINE, time_all
    from jointcompress.deploy.timing import machine_info
    from jointcompress.latency_targets import latency_against_target
    from jointcompress.recipe import parse_recipe

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    split = SimpleNamespace(x_test=torch.randn(64, 1, 4, 4))
    cpu = {k: machine_info()[k] for k in ("cpu", "cores", "vector_isa")}  # the load average moves between readings
    timing = time_all({BASELINE: model, "other": model}, split, threads=1, rounds=2)
    for batch in ("batch1", "batch64"):
        assert {k: timing[batch]["machine"][k] for k in cpu} == cpu
    target = parse_recipe({"target": {"speedup": 1.5, "batch": 4}, "techniques": [{"type": "prune_structured"}]}).target
    verdict = latency_against_target(model, model, torch.randn(4, 1, 4, 4), target, rounds=2)
    assert {k: verdict["machine"][k] for k in cpu} == cpu
    assert f"on {cpu['cpu']} ({cpu['vector_isa']}, {cpu['cores']} cores)" in _latency_line(verdict, target)


def test_a_verdict_whose_goal_moved_from_the_allocations_says_both():
    """A speed-up's goal is the uncompressed model's reading / speedup: read before training (39.7 ms: widths for
    13.2 ms, met) and at the end (29.0 ms: goal 9.65 ms, not met), the verdict named only the second."""
    from jointcompress.cli import _latency_line
    from jointcompress.recipe import parse_recipe

    target = parse_recipe({"target": {"speedup": 3, "batch": 64}, "techniques": [{"type": "prune_structured"}]}).target
    verdict = {"batch": 64, "goal_ms": 9.654, "speedup": 2.45, "threads": 1, "met": False, "flagged": [],
               "interleaved_ms": {"compressed": 11.842, "uncompressed": 28.963},
               "alone_ms": {"compressed": 11.9, "uncompressed": 29.0}}
    assert "widths were chosen" not in _latency_line(verdict, target)
    line = " ".join(_latency_line({**verdict, "allocation_goal_ms": 13.237, "allocation_uncompressed_ms": 39.71},
                                  target).split())
    assert ("(the widths were chosen for 13.237 ms: the uncompressed model read 39.710 ms when the widths were chosen, "
            "28.963 ms now (the machine's load moved))") in line, line
    assert "widths were chosen" not in _latency_line({**verdict, "allocation_goal_ms": 10.0}, target)  # within 10%


def test_ort_sessions_do_not_print_a_warning_per_unused_constant(tmp_path, capfd):
    """ONNX Runtime's graph clean-up printed a line per constant it dropped (about 70 for a MobileNetV2's ReLU6
    clips), burying the package's own parity warning; the factory's sessions log errors only."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    unused = numpy_helper.from_array(np.ones(3, np.float32), "unused_constant")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializer=[unused])
    path = tmp_path / "unused.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    import onnxruntime as ort

    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # a default session says it
    assert "unused_constant" in capfd.readouterr().err
    ort_session(path, 1)
    assert "unused_constant" not in capfd.readouterr().err

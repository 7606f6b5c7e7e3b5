"""What bounds a pruned LeNet-5 at batch 1 in ONNX Runtime: its graph after ORT's optimizations,
where each call's microseconds go (ORT's own profiler), and what legitimately removes work.

    .venv/bin/python benchmarks/against_ort_graph.py [--threads 1] [--rounds 400]

For LeNet-5 at a few pruned widths (random weights: latency does not depend on them):

- **graph**: node count and op types of the exported file and of what ORT runs after its
  graph optimizations at each level (disabled / basic / extended / all), from
  `SessionOptions.optimized_model_filepath`;
- **stages**: the model cut after each stage (conv1+ReLU, pool, conv2+ReLU, pool, fc1, fc2),
  each exported and timed like the rest: where a call's microseconds go. (ORT's own profiler
  is no use here: with profiling on, a 17 us call takes 140-190 us.)
- **timing** (deploy.timing: same threads, spinning off, interleaved rounds, medians, each
  also alone), every ORT variant bound with IOBinding (deploy.onnx_export.bound_predict):
  each optimization level; a static batch-1 export (shapes known when the session is built, as
  a batch-1 deployment may export); a "tight" model (ReLU after max-pooling, fc1 as a 4x4
  convolution, one final Flatten); ORT's per-call floor (a graph that only slices its input);
  and dense fp32 PyTorch as the baseline (torch.inference_mode, the same threads, unchanged);
- **batch 64**: dense PyTorch and the pruned model in ORT (default level), for the speed-up
  at batch 64 on whatever load the machine had at that moment (recorded with `uptime`'s load);
- **neighbours**: our call interleaved with nothing, with dense PyTorch, or with a 4 MB memory
  sweep: whether what runs in between slows it (cache eviction).
- **folded** (`ort_folded`, `ort_deployed`): the graph with its narrow pooled convolutions
  folded (deploy.pooled_conv) and the package's deployment (deploy.ort_deploy: the plain
  export below batch 8, the folded graph from there on), at batch 1 and 64.

    .venv/bin/python benchmarks/against_ort_graph.py --widths 4/16/64,8/16/64,4/16/160 \
        --out benchmarks/results/against_ort_graph_fold.json

Writes benchmarks/results/against_ort_graph.json (or --out; with this command).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from jointcompress.deploy.onnx_export import bound_predict, export_onnx
from jointcompress.deploy.ort_deploy import deploy_onnx
from jointcompress.deploy.timing import ort_session_options, time_contenders
from jointcompress.io import atomic_write_text
from jointcompress.latency_targets import shrunk_to
from jointcompress.models import build_model

WIDTHS = [{"conv1": 8, "conv2": 16, "fc1": 64}, {"conv1": 8, "conv2": 16, "fc1": 160}, {"conv1": 8, "conv2": 8, "fc1": 32}]
LEVELS = ("disable", "basic", "extended", "all")


class Floor(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10] * 1.0


class Tight(nn.Module):
    """The same function as a pruned LeNet-5, written with fewer / cheaper nodes: ReLU after
    max-pooling (they commute: max-pooling is monotone) and fc1 as a convolution over the
    whole 4x4 map, so the only reshape is the last one."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.conv1, self.conv2, self.fc2 = m.conv1, m.conv2, m.fc2
        c2 = m.conv2.out_channels
        self.fc1 = nn.Conv2d(c2, m.fc1.out_features, 4)
        with torch.no_grad():
            self.fc1.weight.copy_(m.fc1.weight.view(m.fc1.out_features, c2, 4, 4))
            self.fc1.bias.copy_(m.fc1.bias)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc2(F.relu(self.fc1(x)).flatten(1))


def session(path: Path, threads: int, level: str = "all", save_to: Path | None = None, profile: str | None = None):
    import onnxruntime as ort

    opts = ort_session_options(threads)
    opts.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                     "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                     "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    if save_to is not None:
        opts.optimized_model_filepath = str(save_to)
    if profile is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def op_counts(path: Path) -> dict:
    import onnx

    nodes = onnx.load(str(path)).graph.node
    return {"nodes": len(nodes), "ops": dict(collections.Counter(n.op_type for n in nodes))}


def graphs(path: Path, work: Path, threads: int) -> dict:
    out = {"exported": op_counts(path)}
    for level in LEVELS:
        saved = work / f"opt_{level}.onnx"
        session(path, threads, level, save_to=saved)
        out[level] = op_counts(saved)
    return out


class Prefix(nn.Module):
    """The pruned LeNet-5 cut after its first `k` stages (conv1+relu, pool, conv2+relu, pool,
    flatten+fc1+relu, fc2): timing k = 1..6 splits a call's microseconds by stage."""

    def __init__(self, m: nn.Module, k: int):
        super().__init__()
        self.m, self.k = m, k

    def forward(self, x):
        m = self.m
        stages = [lambda t: F.relu(m.conv1(t)), lambda t: F.max_pool2d(t, 2), lambda t: F.relu(m.conv2(t)),
                  lambda t: F.max_pool2d(t, 2), lambda t: F.relu(m.fc1(t.flatten(1))), m.fc2]
        for stage in stages[:self.k]:
            x = stage(x)
        return x


STAGES = ("conv1_relu", "pool1", "conv2_relu", "pool2", "flatten_fc1_relu", "fc2")


def contenders(widths: dict, work: Path, threads: int) -> tuple[dict, dict]:
    dense = build_model("lenet5").eval()
    example = torch.randn(2, 1, 28, 28)
    model = shrunk_to(dense, example, widths)
    path = export_onnx(model, work / "m.onnx", example)
    tight = Tight(model).eval()
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(tight(x), model(x), atol=1e-5)  # the same function
    tight_path = export_onnx(tight, work / "tight.onnx", example)
    static = work / "static_b1.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (example[:1],), str(static), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    floor = export_onnx(Floor(), work / "floor.onnx", example)
    fns = {"dense_torch": dense, "pruned_torch": model}
    for k in range(1, len(STAGES)):  # k = len(STAGES) is the whole model (ort_all)
        fns[f"ort_upto_{STAGES[k - 1]}"] = bound_predict(session(export_onnx(Prefix(model, k), work / f"prefix{k}.onnx",
                                                                             example), threads))
    fns.update({f"ort_{lv}": bound_predict(session(path, threads, lv)) for lv in LEVELS})
    deployed = deploy_onnx(path, threads)
    if deployed.folded is not None:
        fns["ort_folded"] = bound_predict(session(deployed.folded, threads))
    fns["ort_deployed"] = deployed.predict()
    fns.update({"ort_static_b1": bound_predict(session(static, threads)),
                "ort_tight": bound_predict(session(tight_path, threads)),
                "ort_tight_static_b1": bound_predict(session(_static(tight, example, work), threads)),
                "ort_floor": bound_predict(session(floor, threads))})
    return fns, {"pruned": graphs(path, work, threads), "tight": graphs(tight_path, work, threads),
                 "static_b1": graphs(static, work, threads),
                 **({"folded": graphs(deployed.folded, work, threads)} if deployed.folded is not None else {})}


def _static(model: nn.Module, example, work: Path) -> Path:
    path = work / "tight_static_b1.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (example[:1],), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    return path


def neighbours(ours, dense: nn.Module, threads: int, rounds: int) -> dict:
    """Our batch-1 call interleaved with one other contender at a time: nothing, dense PyTorch,
    or a plain sweep over 4 MB of memory (evicts caches, computes nothing). If the sweep slows
    our call as much as dense PyTorch does, the interleaved slowdown is cache eviction."""
    x = torch.randn(1, 1, 28, 28)
    buf = torch.zeros(1 << 20)  # 4 MB of float32
    others = {"nothing": lambda: None, "dense_torch": lambda: dense(x), "memory_sweep_4mb": lambda: buf.add_(1.0)}
    out = {}
    for name, other in others.items():
        t = time_contenders({"ours": lambda: ours(x), "other": other}, threads=threads, rounds=rounds)
        out[name] = {"ours_interleaved_us": 1e3 * t.interleaved_ms["ours"], "ours_alone_us": 1e3 * t.alone_ms["ours"]}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--shared-machine", default="not stated (pass --shared-machine)")
    ap.add_argument("--widths", default=None, help="conv1/conv2/fc1,... (default: 8/16/64, 8/16/160, 8/8/32)")
    ap.add_argument("--out", default="benchmarks/results/against_ort_graph.json")
    args = ap.parse_args()
    all_widths = WIDTHS if args.widths is None else [dict(zip(("conv1", "conv2", "fc1"), map(int, w.split("/"))))
                                                 for w in args.widths.split(",")]
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="ort-graph-"))
    rows, load_before = [], os.getloadavg()
    for widths in all_widths:
        fns, graph = contenders(widths, work, args.threads)
        x = torch.randn(1, 1, 28, 28)
        t = time_contenders({k: (lambda f=f: f(x)) for k, f in fns.items()}, threads=args.threads, rounds=args.rounds)
        row = {"widths": widths, "graph": graph,
               "neighbours": neighbours(fns["ort_all"], fns["dense_torch"], args.threads, args.rounds),
               "batch1": {"interleaved_us": {k: 1e3 * v for k, v in t.interleaved_ms.items()},
                          "alone_us": {k: 1e3 * v for k, v in t.alone_ms.items()}, "flagged": t.flagged}}
        x64 = torch.randn(64, 1, 28, 28)
        b64 = {k: fns[k] for k in ("dense_torch", "ort_all", "ort_folded", "ort_deployed") if k in fns}
        t = time_contenders({k: (lambda f=f: f(x64)) for k, f in b64.items()}, threads=args.threads,
                            rounds=max(10, args.rounds // 10))
        row["batch64"] = {"interleaved_ms": t.interleaved_ms, "alone_ms": t.alone_ms, "flagged": t.flagged}
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = f"python benchmarks/against_ort_graph.py --threads {args.threads} --rounds {args.rounds}"
    command += (f" --widths {args.widths}" if args.widths else "") + (
        f" --out {args.out}" if args.out != ap.get_default("out") else "")
    result = {"command": command, "graph_rewrite": "ort_folded: deploy.pooled_conv; ort_deployed: deploy.ort_deploy",
              "threads": args.threads, "machine": {"shared": args.shared_machine, "cpus": os.cpu_count(),
                                                   "load_average_before_after": [load_before, os.getloadavg()]},
              "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__, "rows": rows}
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

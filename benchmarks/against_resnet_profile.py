"""Where a pruned small ResNet's ONNX Runtime time goes: a per-node profile at a few widths.

    python benchmarks/against_resnet_profile.py --widths 16 8 4 --out benchmarks/results/against_resnet_profile.json
    python benchmarks/against_resnet_profile.py --widths 16 8 4 --drop-blocks layer1 \
        --out benchmarks/results/against_resnet_profile_drop_layer1.json

Why: `bench --against` on the small ResNet (models.SmallResNet) stops far short of 20x, and the
question is what bounds it. For every width (every channel group cut to it, random weights:
the time does not depend on the values) the model is deployed as `bench --against` deploys it
(deploy.ort_deploy, ONNX Runtime fp32, 1 thread, spinning off, IOBinding), timed alone
(deploy.timing, least of 3 medians) at batch 64 and 1 against dense fp32 PyTorch, then run
with ORT's profiler on: the time of every node is summed by op type and by stage (stem,
layer1-3, head), and the MACs of each stage are counted, so the share of time a stage takes
can be set against its share of the work. `uptime`'s load average is recorded.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from jointcompress.bench import count_macs
from jointcompress.block_drop import drop_blocks
from jointcompress.deploy.ort_deploy import deploy_fp32
from jointcompress.deploy.timing import ort_session_options, steady_ms
from jointcompress.graph import discover_groups
from jointcompress.io import atomic_write_text
from jointcompress.latency_targets import shrunk_to
from jointcompress.models import build_model

STAGES = ("stem", "layer1", "layer2", "layer3")


def stage_of(node: str, op: str = "Conv") -> str:
    """The stage a node belongs to; ORT's inserted layout reorders are a stage of their own, and
    the stem's convolution is named after the ReLU it absorbs ("/Relu_output_0_nchwc")."""
    if op.startswith("Reorder"):
        return "layout reorders (NCHWc)"
    stage = next((s for s in STAGES if f"/{s}/" in node or node.startswith(f"{s}/")), None)
    return stage or ("stem" if op == "Conv" else "head (pool, fc)")


def profile(path: Path, x: torch.Tensor, calls: int, warmup: int = 5) -> dict:
    """ORT's per-node times (us per call), by op type and by stage, over `calls` calls after
    `warmup` (whose nodes are left out: the first call allocates and packs weights)."""
    import onnxruntime as ort

    opts = ort_session_options(1)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    for _ in range(warmup + calls):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    start = runs[warmup]
    by_op, by_stage, total = defaultdict(float), defaultdict(float), 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            us, op = e["dur"] / calls, e["args"]["op_name"]
            by_op[op] += us
            by_stage[stage_of(e["name"], op)] += us
            total += us
    return {"nodes_us_per_call": total, "by_op_us": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "by_stage_us": dict(by_stage), "nodes": len({e["name"] for e in events if e.get("cat") == "Node"})}


def stage_macs(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """MACs of one sample per stage (conv and linear layers)."""
    out = defaultdict(int)
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            def hook(mod, inp, o, name=name):
                per_out = mod.weight[0].numel() if isinstance(mod, torch.nn.Conv2d) else mod.in_features
                out[stage_of("/" + name.replace(".", "/") + "/") if not name.startswith("fc") else "head (pool, fc)"] += \
                    per_out * o[0].numel()
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return dict(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 8, 4])
    ap.add_argument("--calls64", type=int, default=50)
    ap.add_argument("--calls1", type=int, default=2000)
    ap.add_argument("--drop-blocks", default="", help="residual blocks removed first (block_drop), comma-separated")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    load_before = os.getloadavg()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = build_model("resnet").eval()
    x2, xs = torch.randn(2, 1, 28, 28), {1: torch.randn(1, 1, 28, 28), 64: torch.randn(64, 1, 28, 28)}
    blocks = [b for b in args.drop_blocks.split(",") if b]
    base = drop_blocks(copy.deepcopy(dense), blocks, x2) if blocks else dense  # timed against the whole dense model
    groups = discover_groups(base, x2)[0]
    dense_ms = {b: steady_ms(lambda: dense(x), 1, 20 if b == 64 else 200, 3) for b, x in xs.items()}
    work, rows = Path(tempfile.mkdtemp(prefix="jc-resnet-profile-")), {}
    for w in args.widths:
        model = shrunk_to(base, x2, {g.name: min(w, g.channels) for g in groups})
        dep = deploy_fp32(model, work / f"w{w}.onnx", x2, 1)
        run = dep.predict()
        ms = {b: steady_ms(lambda: run(x), 1, 30 if b == 64 else 300, 3) for b, x in xs.items()}
        rows[str(w)] = {"widths": {g.name: min(w, g.channels) for g in groups}, "macs": count_macs(model, x2),
                        "macs_by_stage": stage_macs(model, x2),
                        **{f"batch{b}": {"ms_alone": ms[b], "speedup_vs_dense_fp32_torch": dense_ms[b] / ms[b],
                                         "profile": profile(dep.graph_for(b), xs[b], args.calls64 if b == 64 else args.calls1)}
                           for b in xs}}
        print(w, {b: round(dense_ms[b] / ms[b], 2) for b in xs}, file=sys.stderr, flush=True)
    result = {"command": "python benchmarks/against_resnet_profile.py " + " ".join(sys.argv[1:]), "threads": 1,
              "load_average_before_after": [load_before, os.getloadavg()],
              "dense_fp32_torch_ms_alone": {f"batch{b}": v for b, v in dense_ms.items()},
              "dense_macs": count_macs(dense, x2), "runtime": run.runtime, "dropped_blocks": blocks, "widths": rows}
    atomic_write_text(Path(args.out), json.dumps(result, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()

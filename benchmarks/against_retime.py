"""Re-time the deployed contenders of earlier benchmarks/against_torch_pruning.py runs, e.g. on
a quiet machine, without training them again:

    python benchmarks/against_retime.py --runs benchmarks/results/against_torch_pruning_lenet5_fold_seed0.json \
        --teacher /tmp/jc-teacher-lenet5-e8.safetensors --rounds64 100 --rounds1 1000 \
        --out benchmarks/results/against_retime_lenet5_quiet.json

Training needs ~20 minutes a run on the shared 2-core machine and its timings are taken
under whatever load is there; the ONNX files each run deploys stay in its `workdir` (ours
and Torch-Pruning's, fp32 and int8). This script loads them with the package's deployment
(deploy.ort_deploy: the plain export below batch 8, the graph with pooled convolutions folded
from batch 8 on; the int8 files as they are), checks every deployment's accuracy on the whole
MNIST test split (and that the two fp32 graphs give the same logits), and times, with
deploy.timing at 1 thread (ORT intra-op 1, spinning off; warm-up, rotating interleaved
rounds, medians, each contender also alone):

- **all**: dense fp32 PyTorch and every ORT contender of every run, interleaved together;
- **after_dense**: each ORT contender interleaved with dense PyTorch only, so that it always
  runs right after it: the strictest reading (dense PyTorch evicts the caches; at batch 64
  that costs a small model ~0.2 ms, a 64 MB memory sweep costs the same).

Speed-ups are dense PyTorch's median over each contender's, interleaved and alone.
`uptime`'s load average before and after is recorded with the command.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from jointcompress.bench import batch_of
from jointcompress.data import load_mnist
from jointcompress.deploy.against import AgainstConfig, accuracy_of, dense_teacher, int8_runner
from jointcompress.deploy.onnx_export import ort_session
from jointcompress.deploy.ort_deploy import deploy_onnx
from jointcompress.deploy.timing import time_contenders
from jointcompress.io import atomic_write_text

BASELINE = "dense_fp32_torch"


def contenders(run: dict, tag: str, threads: int) -> tuple[dict, dict]:
    """The run's ORT deployments found in its workdir: name -> predict, name -> runtime record."""
    work = Path(run["workdir"])
    fns, runtimes = {}, {}
    for who in ("ours", "tp"):
        plain = work / f"{who}_fp32.onnx"
        if plain.is_file():
            run_fn = deploy_onnx(plain, threads).predict()
            fns[f"{tag}{who}_fp32_ort"], runtimes[f"{tag}{who}_fp32_ort"] = run_fn, run_fn.runtime
        int8 = work / f"{who}_int8" / "model_int8.onnx"
        if int8.is_file():
            run_fn = int8_runner(int8, threads)
            fns[f"{tag}{who}_int8_ort"], runtimes[f"{tag}{who}_int8_ort"] = run_fn, run_fn.runtime
    if not fns:
        sys.exit(f"--runs: no ONNX files left in {work} (the run's workdir); re-run against_torch_pruning.py")
    return fns, runtimes


def fp32_graphs_agree(run: dict, x: torch.Tensor, threads: int) -> dict:
    """Max |logit difference| between the plain and the folded graph of each fp32 deployment."""
    out = {}
    for who in ("ours", "tp"):
        plain = Path(run["workdir"]) / f"{who}_fp32.onnx"
        if plain.is_file():
            dep = deploy_onnx(plain, threads)
            if dep.folded is not None:
                a, b = (ort_session(p, threads).run(None, {"input": x.numpy()})[0] for p in (dep.plain, dep.folded))
                out[who] = float(np.abs(a - b).max())
    return out


def timed(fns: dict, x: torch.Tensor, threads: int, rounds: int) -> dict:
    t = time_contenders({k: (lambda f=f: f(x)) for k, f in fns.items()}, threads=threads, rounds=rounds)
    base_i, base_a = t.interleaved_ms[BASELINE], t.alone_ms[BASELINE]
    return {"interleaved_ms": t.interleaved_ms, "alone_ms": t.alone_ms, "flagged": t.flagged,
            "speedup_interleaved": {k: base_i / v for k, v in t.interleaved_ms.items()},
            "speedup_alone": {k: base_a / v for k, v in t.alone_ms.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True, help="result JSONs of against_torch_pruning.py")
    ap.add_argument("--teacher", required=True, help="the dense weights those runs used (safetensors)")
    ap.add_argument("--data", default="../shared/datasets/mnist/mnist.npz")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds64", type=int, default=100)
    ap.add_argument("--rounds1", type=int, default=1000)
    ap.add_argument("--machine", default="quiet: no other jobs on the 2 cores")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    load_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    split = load_mnist(args.data)
    runs = [json.loads(Path(p).read_text()) for p in args.runs]
    models = {run["config"]["model"] for run in runs}
    if len(models) != 1:
        sys.exit(f"--runs: the runs compress different models ({', '.join(sorted(models))}); re-time them separately")
    teacher = dense_teacher(AgainstConfig(model=models.pop()), split, Path(args.teacher))[0]
    fns, runtimes, sources = {BASELINE: teacher}, {BASELINE: "pytorch eager fp32"}, {}
    seeds = [run["config"]["seed"] for run in runs]
    for i, (p, run) in enumerate(zip(args.runs, runs)):  # runs told apart by seed, else by their place in --runs
        tag = "" if len(runs) == 1 else f"s{seeds[i]}_" if len(set(seeds)) == len(runs) else f"r{i}_"
        f, r = contenders(run, tag, args.threads)
        fns.update(f)
        runtimes.update(r)
        sources[p] = {"widths": run["widths"], "tag": tag, "fp32_graphs_max_abs_diff": fp32_graphs_agree(
            run, split.x_test[:1000], args.threads)}
    accuracy = {k: accuracy_of(f, split.x_test, split.y_test) for k, f in fns.items()}
    timing = {}
    for bs, rounds in ((64, args.rounds64), (1, args.rounds1)):
        x = batch_of(split.x_test, bs)
        pairs = {k: timed({BASELINE: teacher, k: f}, x, args.threads, rounds) for k, f in fns.items() if k != BASELINE}
        timing[f"batch{bs}"] = {"all": timed(fns, x, args.threads, rounds), "after_dense": pairs}
        print(json.dumps({f"batch{bs}": {k: v["speedup_interleaved"][k] for k, v in pairs.items()}}), flush=True)
    root = Path(__file__).resolve().parents[1]  # paths inside the repository are stored relative to it
    command = " ".join(["python benchmarks/against_retime.py"] + [
        str(Path(a).resolve().relative_to(root)) if Path(a).is_absolute() and Path(a).resolve().is_relative_to(root)
        else a for a in sys.argv[1:]])
    result = {"command": command, "threads": args.threads,
              "machine": {"shared": args.machine, "cpus": os.cpu_count(),
                          "load_average_before_after": [load_before, os.getloadavg()]},
              "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__,
              "sources": sources, "runtimes": runtimes, "accuracy": accuracy, "timing": timing}
    atomic_write_text(Path(args.out), json.dumps(result, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()

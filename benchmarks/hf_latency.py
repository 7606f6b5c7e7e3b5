"""Re-time the SST-2 MiniLM teacher and the int8 students of hf_sst2_core.py, the honest way.

    .venv/bin/python benchmarks/hf_latency.py [--threads 1] [--rounds 5]

The shapes come from the committed results (benchmarks/results/hf_sst2_core{,_sequential,
_progressive}.json: 4 layers, heads and FFN neurons per layer, trimmed vocabulary); the teacher
is MiniLM-L6-H384 (6 layers, 12 heads, 1,536 FFN neurons, 30,522 word pieces). Latency does
not depend on the weights' values, so both get random weights (the trained folders are not
kept in the repository); accuracies stay those of the results files. Teacher fp32 in PyTorch,
students as ONNX Runtime dynamic int8 (what hf_sst2_core.py deploys), batch 1 and 32, seq len
64, full-length random rows, every contender with --threads threads (ORT: intra-op threads,
one inter-op thread, spinning off), interleaved rounds, medians, each also timed alone
(deploy.timing via hf.int8.interleaved_latency). Writes benchmarks/results/hf_latency.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import warnings
from pathlib import Path

import torch

from jointcompress.hf.int8 import OrtClassifier, export_onnx, interleaved_latency, quantize_onnx_int8, torch_logits_fn

RESULTS = Path(__file__).parent / "results"
RUNS = {"joint": "hf_sst2_core.json", "sequential": "hf_sst2_core_sequential.json",
        "progressive": "hf_sst2_core_progressive.json"}
MINILM = dict(hidden_size=384, num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512,
              type_vocab_size=2, num_labels=2)


def teacher():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=30522, num_hidden_layers=6, **MINILM)).eval()


def student(shape: dict):
    from jointcompress.hf.modeling_pruned import JCBertConfig, JCBertForSequenceClassification

    torch.manual_seed(0)
    cfg = JCBertConfig(vocab_size=shape["vocab_size"], num_hidden_layers=shape["layers"], **MINILM,
                       heads_per_layer=shape["heads_per_layer"], intermediate_per_layer=shape["intermediate_per_layer"])
    return JCBertForSequenceClassification(cfg).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="hf-latency-"))
    t = teacher()
    fns = {"teacher_fp32_torch": (torch_logits_fn(t), 30522)}
    shapes = {}
    for mode, name in RUNS.items():
        shape = json.loads((RESULTS / name).read_text())["student"]
        shapes[mode] = {k: shape[k] for k in ("layers", "heads_per_layer", "intermediate_per_layer", "vocab_size")}
        fp32 = export_onnx(student(shapes[mode]), work / f"{mode}_fp32.onnx", seq_len=64)
        q = quantize_onnx_int8(fp32, work / f"{mode}_int8.onnx")
        fns[f"{mode}_int8_onnx"] = (OrtClassifier(q, threads=args.threads), shapes[mode]["vocab_size"])
    lat = interleaved_latency(fns, 64, args.rounds, threads=args.threads)
    base = lat["teacher_fp32_torch"]
    speedups = {mode: {f"speedup_b{bs}": round(base[f"batch{bs}_ms"] / lat[f"{mode}_int8_onnx"][f"batch{bs}_ms"], 2)
                       for bs in (1, 32)} for mode in RUNS}
    result = {
        "command": f"python benchmarks/hf_latency.py --threads {args.threads} --rounds {args.rounds}",
        "threads": args.threads, "load_average_before_after": [load_before, os.getloadavg()], "seq_len": 64, "rounds": args.rounds, "cpu": platform.processor() or platform.machine(),
        "weights": "random (latency does not depend on values); shapes from the hf_sst2_core results",
        "students": shapes, "latency_ms": lat, "speedup_vs_teacher_fp32_torch": speedups,
    }
    (RESULTS / "hf_latency.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""What the safety check of structured pruning costs at setup: discover_groups with and without `verify`.

    PYTHONPATH=src .venv/bin/python benchmarks/group_check_cost.py --rounds 3

On full-size random-init transformers models (no download): BERT-base (hidden 768, 12 layers,
sequence 16, float inputs_embeds) and ResNet-50 (3x64x64). `verify=False` is the static part
(trace + rules); `verify=True` adds the zeroed-vs-removed check on a randomized copy. One
warm-up, then interleaved rounds; medians. Writes benchmarks/results/group_check_cost.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from arch_models import Logits  # noqa: E402
from jointcompress.graph import discover_groups  # noqa: E402

THREADS = 1


def models():
    import transformers as t

    torch.manual_seed(0)
    bert = Logits(t.BertForSequenceClassification(t.BertConfig(num_labels=2)).eval(), "inputs_embeds")
    resnet = Logits(t.ResNetForImageClassification(t.ResNetConfig(num_labels=10)).eval(), "pixel_values")
    return {"bert-base": (bert, torch.randn(2, 16, 768)), "resnet-50": (resnet, torch.randn(2, 3, 64, 64))}


def timed(model, x, verify: bool) -> tuple[float, int]:
    start = time.perf_counter()
    groups, _ = discover_groups(model, x, verify=verify)
    return time.perf_counter() - start, len(groups)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    results = {}
    for name, (model, x) in models().items():
        timed(model, x, verify=True)  # warm-up
        static, verified, counts = [], [], set()
        for _ in range(args.rounds):  # interleaved
            s, n_static = timed(model, x, verify=False)
            v, n_verified = timed(model, x, verify=True)
            static.append(s)
            verified.append(v)
            counts.add((n_static, n_verified))
        results[name] = {
            "static_s_median": statistics.median(static), "verified_s_median": statistics.median(verified),
            "static_s": static, "verified_s": verified, "groups_static_verified": sorted(counts),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        print(name, results[name], flush=True)
    out = ROOT / "benchmarks" / "results" / "group_check_cost.json"
    out.write_text(json.dumps({
        "command": f"PYTHONPATH=src .venv/bin/python benchmarks/group_check_cost.py --rounds {args.rounds}",
        "torch": torch.__version__, "threads": THREADS, "results": results,
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""int8 ONNX Runtime with the logits rounded to uint8 (the export before) vs kept fp32 (now).

    .venv/bin/python benchmarks/int8_logits.py [--artifact benchmarks/results/demo/structured] [--rounds 200]

Loads the demo's structured model (channels removed, 8-bit LSQ weights), builds both int8
models on the same calibration images as the demo, and measures each one's accuracy and top-1
agreement with the fp32 model on the digits' held-out images, and their latency at batch 1 and
64 in one timing run (1 thread, ORT spinning off, interleaved rounds, medians, each also alone).
Writes benchmarks/results/int8_logits.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch

from jointcompress.artifact.store import load_with_spec
from jointcompress.data import load_digits
from jointcompress.deploy.int8 import int8_parity, quantize_onnxruntime
from jointcompress.deploy.timing import describe, time_contenders
from jointcompress.pipeline import builder_for

RESULT = Path(__file__).parent / "results" / "int8_logits.json"


def variant_row(model, int8, split) -> dict:
    parity = int8_parity(model, int8, (split.x_test, split.y_test))
    with torch.no_grad():
        agree = (model(split.x_test).argmax(1) == int8(split.x_test).argmax(1)).float().mean().item()
    return {"accuracy": parity.metric_deployed, "fp32_accuracy": parity.metric_reference,
            "agreement_with_fp32": agree, "max_abs_logit_diff": parity.max_abs_logit_diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default="benchmarks/results/demo/structured")
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    split = load_digits()
    model, spec = load_with_spec(args.artifact, builder_for("lenet5", split))
    model.eval()
    calibration = (split.x_train[:512], split.y_train[:512])
    rows, models = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fp32_outputs in (("uint8_logits", False), ("fp32_logits", True)):
            work = Path(tmp) / name
            work.mkdir()
            models[name] = quantize_onnxruntime(model, spec, calibration, work, split.x_test[:64], threads=1,
                                                fp32_outputs=fp32_outputs)
            rows[name] = variant_row(model, models[name], split)
        for batch in (1, 64):
            x = split.x_test[:batch]
            timing = time_contenders({n: (lambda m=m: m(x)) for n, m in models.items()}, threads=1, rounds=args.rounds)
            for name in models:
                rows[name][f"ms_b{batch}"] = timing.interleaved_ms[name]
                rows[name][f"ms_b{batch}_alone"] = timing.alone_ms[name]
            rows.setdefault("timing", {})[f"b{batch}"] = describe(timing)
    cmd = "python benchmarks/int8_logits.py" + (f" --artifact {args.artifact}" if args.artifact != ap.get_default("artifact") else "")
    RESULT.write_text(json.dumps({"command": cmd, "held_out_rows": len(split.x_test), **rows}, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

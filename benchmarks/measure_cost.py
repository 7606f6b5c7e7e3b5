"""What one measurement of the weights file costs on a large model: the size budget of `mode: joint`
finalizes a copy and encodes the whole file, as save() does, some 40 times a run plus its landing's
probes. Timed (process CPU time, 1 thread) on a transformers BERT with random weights, prepared as
`compress` prepares `mode: joint` under a ratio target, with the weights moved (as training moves
them, so no layer's cached encoding is reused), twice: as the encoder codes today (zstd level 19 on a
part over 256 KiB only where a sample says it can beat ans) and with level 19 tried on every part, as
before. Both must give the same file bytes.

    .venv/bin/python benchmarks/measure_cost.py --layers 6 --hidden 512 --out benchmarks/results/measure_cost_bert6.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def prepared_bert(layers: int, hidden: int):
    """A BERT classifier (random weights) and the same model prepared for `mode: joint` at 20x."""
    import transformers as T

    import jointcompress

    config = T.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                          intermediate_size=4 * hidden, num_labels=2)
    torch.manual_seed(0)
    teacher = T.BertForSequenceClassification(config).eval()
    student = copy.deepcopy(teacher)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    recipe = {"mode": "joint", "target": {"ratio": 20}, "techniques": [
        {"type": "quant_lsq", "bits": 4, "embeddings": True}, {"type": "distill_kd", "temperature": 4, "alpha": 0.7}]}
    jointcompress.prepare(student, recipe, total_steps=4000, teacher=teacher, example_inputs=example)
    with torch.no_grad():  # training moves every weight: no layer's cached encoding is reused
        for name, p in student.named_parameters():
            if name.endswith("original"):
                p.mul_(1.03)
    return student, example


def timed(student, example) -> tuple[float, dict]:
    """One measurement, from a cold encoding cache (training moves every layer: nothing would hit it)."""
    from jointcompress.artifact import layer_codec
    from jointcompress.techniques.size_estimate import measured_bytes

    layer_codec._CACHE = layer_codec._EncodingCache()
    started = time.process_time()
    sizes = measured_bytes(student, example)
    return time.process_time() - started, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from jointcompress.artifact import entropy
    from jointcompress.deploy.timing import machine_info

    student, example = prepared_bert(args.layers, args.hidden)
    today_s, today = timed(student, example)
    sampled = entropy._zstd_may_win
    entropy._zstd_may_win = lambda raw, best_other: True  # level 19 on every part, as before
    try:
        before_s, before = timed(student, example)
    finally:
        entropy._zstd_may_win = sampled
    result = {"command": f"python benchmarks/measure_cost.py --layers {args.layers} --hidden {args.hidden} --out {args.out}",
              "parameters": sum(p.numel() for p in student.parameters()), "threads": 1, "machine": machine_info(),
              "cpu_seconds": {"today": today_s, "level19_every_part": before_s},
              "file_bytes": {"today": today["total"], "level19_every_part": before["total"]},
              "same_file": today == before}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("parameters", "cpu_seconds", "file_bytes", "same_file")}, indent=1))


if __name__ == "__main__":
    main()

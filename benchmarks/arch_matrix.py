"""The architecture matrix as a table: which architecture passes which stage, or the error it gives.

    PYTHONPATH=src .venv/bin/python benchmarks/arch_matrix.py

transformers' own classes at tiny random configs (tests/arch_models.py: hidden 32, 2 layers,
images 32x32, text as float inputs_embeds), two plain torch signal CNNs (Conv1d, Conv3d) and torch's own
nn.TransformerEncoder (its nn.MultiheadAttention converted by attention.mha_to_linear), each
through unstructured and structured pruning (with 8-bit LSQ, 1 epoch on 8 random samples), the joint mode (zero-level 4-bit LSQ under
a size budget at 1/4 of the fp32 file, 1/6 for ResNet, MobileNetV2 and torch-lstm, 1/5 for ConvNeXt, 2 epochs) and the joint form, what
`mode: joint` trains from a user's prune + 4-bit quantize recipe under a size target (joint_form.py: fixed 4-bit
widths, the paced window, the stiff constraint, landing by Fisher cost; target 1/12 of the fp32 file, 1/4 for
the text encoders, arch_models.joint_ratio); normalization layers and step sizes at the default norm_format and
scale_format (auto: fp16 and log8 under a size target)
-> finalize -> save -> load -> ONNX,
exactly as tests/test_arch_matrix.py runs them. A cell is `ok` with what was checked (relative
logit gap to the previous stage, groups pruned, bytes) or the JointCompressError message.
Writes benchmarks/results/arch_matrix.md (with this command and the torch thread count).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from arch_models import ARCHS, CAUSAL, STAGES, run_cell  # noqa: E402

THREADS = 1
KINDS = ("prune_unstructured", "prune_structured", "joint", "joint_form")


def _cell(status: str, detail: str) -> str:
    text = detail.replace("|", "/").replace("\n", " ")
    return f"ok ({text})" if status == "ok" else f"**error**: {text}"


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()  # --help, not a run
    torch.set_num_threads(THREADS)
    rows, started = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS + CAUSAL:
            for kind in KINDS:
                result = run_cell(arch, kind, tmp)
                cells = [_cell(*result[s]) if s in result else "not run" for s in STAGES]
                rows.append(f"| {arch} | {kind.removeprefix('prune_')} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / "arch_matrix.md"
    header = [
        "# Architecture matrix", "",
        "Command: `PYTHONPATH=src .venv/bin/python benchmarks/arch_matrix.py` "
        f"(torch {torch.__version__}, {THREADS} thread, {time.time() - started:.0f} s).", "",
        "Each row: compress (pruning at 50 % + 8-bit LSQ, 1 epoch, 8 random samples; `joint`: zero-level 4-bit LSQ and "
        "size_budget at a quarter of the fp32 file, a sixth for ResNet, MobileNetV2 and torch-lstm, a fifth for "
        "ConvNeXt, 2 epochs; `joint_form`: "
        "`mode: joint` with a size target on a prune + 4-bit quantize recipe, which trains its joint form (fixed 4-bit "
        "widths, the paced window, landing by Fisher cost), target 1/12 of the fp32 file, 1/4 for the text encoders; "
        "normalization layers in fp16 and step sizes in one byte, the defaults under a size target) -> finalize (relative logit gap "
        "to the masked model) -> save -> load (gap to the finalized model) -> ONNX Runtime (gap to the finalized "
        "model). Text models (and torch-transformer, torch's nn.TransformerEncoder after attention.mha_to_linear, and "
        "torch-lstm, a 2-layer bidirectional nn.LSTM after recurrent.rnn_to_linear) "
        "take float `inputs_embeds`; gpt2 is a causal LM read at its last position.", "",
        "| architecture | compression | " + " | ".join(STAGES) + " |",
        "|---|---|" + "---|" * len(STAGES),
    ]
    out.write_text("\n".join(header + rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

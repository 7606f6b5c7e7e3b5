"""An HF recipe under torchrun (2 processes, gloo): the same heads and neurons are kept on both
ranks, the global batch (and so the number of steps) is the single-process one, evaluation is
reduced over the ranks, and only rank 0 finalizes, exports and writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

from hf_helpers import sst2_folder, teacher_folder  # noqa: E402

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from jointcompress.hf.pipeline import run_hf_recipe

    tmp, out = sys.argv[1], sys.argv[2]
    recipe = {"name": "hf-ddp", "hf": {"student_layers": [0, 3], "max_length": 16},
              "training": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "seed": 0},
              "techniques": [{"type": "prune_heads", "sparsity": 0.5, "end": 0.6},
                             {"type": "prune_ffn", "sparsity": 0.5, "end": 0.6},
                             {"type": "quant_lsq", "bits": 8, "targets": ["*encoder.layer.*"]},
                             {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5, "cache_teacher": True}]}
    s = run_hf_recipe(recipe, out, os.path.join(tmp, "sst2"), os.path.join(tmp, "teacher"), int8=False)
    rank = os.environ.get("RANK", "single")
    if "units_per_layer" not in s:  # rank 0 (or a single process): the full summary
        s = {"rank": rank, "metrics": {"accuracy": s["student"]["dev_accuracy_masked"]}, "steps": s["steps"],
             "world_size": s["world_size"], "units_per_layer": {"prune_heads": s["student"]["heads_per_layer"],
                                                                "prune_ffn": s["student"]["intermediate_per_layer"]}}
    json.dump(s, open(os.path.join(tmp, f"rank-{rank}.json"), "w"))
    """
)


@pytest.mark.slow
def test_hf_recipe_under_torchrun(tmp_path):
    teacher_folder(tmp_path)
    sst2_folder(tmp_path, seed=3, n=56, n_train=40)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                        str(tmp_path), str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "single")], env=env,
                       capture_output=True, text=True, timeout=400)
    assert s.returncode == 0, s.stderr[-3000:]
    r0, r1, single = (json.loads((tmp_path / f"rank-{k}.json").read_text()) for k in ("0", "1", "single"))
    assert r0["world_size"] == 2 and single["world_size"] == 1
    assert r0["units_per_layer"] == r1["units_per_layer"]  # the masks were decided once, for both ranks
    assert sum(r0["units_per_layer"]["prune_heads"]) == 4 and sum(r0["units_per_layer"]["prune_ffn"]) == 64
    assert r0["steps"] == r1["steps"] == single["steps"] == 2 * 5  # batch_size 8 is the global batch: 40 rows
    assert r0["metrics"]["accuracy"] == pytest.approx(r1["metrics"]["accuracy"])  # reduced over the ranks
    written = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert {"artifact", "hf_model", "summary.json", "history.json", "checkpoints"} <= set(written)
    assert not (tmp_path / "ddp" / "onnx").exists()


def test_bucket_sampler_shards_every_global_batch_without_overlap():
    import torch

    from jointcompress.hf.wrapper import BucketBatchSampler

    lengths = torch.randint(1, 30, (37,), generator=torch.Generator().manual_seed(0))

    def batches(rank, world):
        return list(BucketBatchSampler(lengths, 8, 2, torch.Generator().manual_seed(5), rank=rank, world=world))

    full, a, b = batches(0, 1), batches(0, 2), batches(1, 2)
    assert len(full) == len(a) == len(b) == 5
    for g, x, y in zip(full, a, b):
        assert sorted(x + y) == sorted(g) and not set(x) & set(y)  # each global batch split between the ranks

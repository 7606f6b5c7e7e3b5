"""Data-parallel joint compression under torchrun (2 processes, gloo on CPU): masks, scores
and step sizes are identical on every rank, only rank 0 writes, and the result is close to a
single-process run with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file
    from jointcompress import compress
    from jointcompress.data import load_digits, evaluator
    from jointcompress.models import LeNet300

    out = sys.argv[1]
    rank = int(os.environ.get("RANK", "0"))
    tag = f"rank{rank}" if "WORLD_SIZE" in os.environ else "single"

    import atexit
    def _thread_names():
        names = []
        for t in os.listdir("/proc/self/task"):
            try:
                names.append(open(f"/proc/self/task/{t}/comm").read().strip())
            except OSError:
                pass
        return names

    def _threads_at_exit():  # registered first, so it runs after jointcompress's hook (LIFO)
        import time
        for _ in range(40):  # gloo's loop thread ends a moment after the group is destroyed: wait up to 2 s
            names = _thread_names()
            if not any("gloo" in n for n in names):
                break
            time.sleep(0.05)
        json.dump({"initialized": dist.is_initialized(), "threads": names}, open(os.path.join(out, tag + ".exit"), "w"))
    atexit.register(_threads_at_exit)

    split = load_digits()
    torch.manual_seed(1)
    model = LeNet300(64, 10)
    recipe = {"techniques": [
                {"type": "prune_unstructured", "sparsity": 0.7, "criterion": "learned", "scope": "global", "end": 0.5},
                {"type": "quant_lsq", "bits": 4, "start": 0.3}],
              "training": {"epochs": 3, "batch_size": 64, "lr": 3e-3}}
    res = compress(model, recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test),
                   run_dir=os.path.join(out, "run_" + ("dist" if tag != "single" else "single")), checkpoint_every=7)
    state = {"mask." + k: v.contiguous() for k, v in res.techniques[0].state_dict()["masks"].items()}
    state.update({"model." + k: v.contiguous() for k, v in model.state_dict().items()})
    save_file(state, os.path.join(out, tag + ".safetensors"))
    info = {"metrics": res.metrics, "world": dist.get_world_size() if dist.is_initialized() else 1,
            "steps": res.history.epochs[-1]["step"], "sparsity": res.techniques[0].achieved_sparsity()}
    json.dump(info, open(os.path.join(out, tag + ".json"), "w"))
    # no destroy_process_group() here on purpose: jointcompress created the group, so it must
    # also tear it down at exit (gloo otherwise can abort the process after a good run)
    """
)


@pytest.mark.slow
def test_torchrun_two_processes_identical_masks_and_close_to_single_process(tmp_path):
    from safetensors.torch import load_file

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("reads the threads left at exit from /proc (Linux)")

    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=400)
    assert s.returncode == 0, s.stderr[-3000:]

    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert any(k.endswith(".hard") for k in r0) and any(k.endswith("log_step") for k in r0)
    for k in r0:  # masks, scores, thresholds, LSQ step sizes, weights: bit-identical on both ranks
        assert torch.equal(r0[k], r1[k]), k
    j0, j1, js = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("rank0", "rank1", "single"))
    assert j0["world"] == 2 and js["world"] == 1
    assert j0["metrics"] == j1["metrics"]  # evaluation reduced over the ranks
    assert j0["steps"] == js["steps"]  # training.batch_size is the global batch: same number of steps
    assert abs(j0["sparsity"] - js["sparsity"]) < 1e-3
    assert abs(j0["metrics"]["accuracy"] - js["metrics"]["accuracy"]) < 0.08, (j0, js)
    # the group compress created was torn down before interpreter finalization on both ranks,
    # and really freed: no gloo thread is left to race the interpreter's shutdown (SIGABRT)
    for r in (0, 1):
        at_exit = json.loads((tmp_path / f"rank{r}.exit").read_text())
        assert at_exit["initialized"] is False
        assert not [n for n in at_exit["threads"] if "gloo" in n], at_exit
    # only rank 0 wrote checkpoints (one directory, complete files)
    assert sorted(p.name for p in (tmp_path / "run_dist" / "checkpoints").iterdir())[-1] == "ckpt-000000066.pt"

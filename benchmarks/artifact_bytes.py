"""Where the artifact's bytes go, before and after the version-2 format (issue: every byte pays).

    PYTHONPATH=src .venv/bin/python benchmarks/artifact_bytes.py --teacher-epochs 1

For LeNet-300-100 at 100x and LeNet-5 at 200x and 400x (MNIST, teachers trained for
--teacher-epochs epochs, seed 0), the size allocator (`targets.allocate_size`, 4-bit, magnitude
ranking, ERK densities) fits per-layer sparsities so that the weights file hits the target,
and the allocation's candidate model (pruned + rounded onto its LSQ grid, *no fine-tuning*) is
saved as an artifact. Each point is run three times, each in its own process:

* ``before``:  the code at --before-commit (format version 1: fp32 scales and biases,
  safetensors container, zstd), extracted with `git archive`;
* ``after``:   this tree with the defaults (fp16 scales, fp16 biases, jcw container, ans);
* ``after-compact``: this tree with ``scale_format: log8`` and ``bias_format: int``.

Same teacher, same recipe (min_keep 0.001 so that the per-layer floor is not what binds), so at
equal bytes the sides differ only in what the format spends on side data, i.e. in how many
weights they can keep. Recorded per side: the byte breakdown (values, indices, scales, biases,
other, container; it sums to the file), kept weights, bits per stored weight (values + indices),
and test accuracy of the candidate (without fine-tuning: it shows what the extra weights buy,
not what a trained run reaches). For the ``after`` artifacts each layer's coding is also
compared with Deep Compression's relative indices + Huffman, zstd alone, and the i.i.d. entropy
bound (artifact/baselines.py). Writes benchmarks/results/artifact_bytes.json.

With --train-epochs E, LeNet-300-100 at 100x and LeNet-5 at 400x are also compressed for real
on each side (the compare_mnist recipe: joint, 4-bit LSQ, KD, with size steering; trained on the
first --train-images MNIST training images for E epochs, evaluated on the 10,000 test images),
so the accuracy at equal bytes is a trained one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MNIST = "../shared/datasets/mnist/mnist.npz"
POINTS = [("lenet300", 100.0), ("lenet5", 200.0), ("lenet5", 400.0)]
TRAIN_POINTS = [("lenet300", 100.0), ("lenet5", 400.0)]
SIDES = {"before": {}, "after": {}, "after-compact": {"scale_format": "log8", "bias_format": "int"}}
KINDS = ("values", "indices", "scales", "biases", "other", "container")
PART_KIND = {"values": "values", "indices": "indices", "scale": "scales", "bias": "biases"}


def recipe(model: str, ratio: float, formats: dict) -> dict:
    return {"name": "artifact-bytes", "model": model, "target": {"ratio": ratio}, "techniques": [
        {"type": "prune_unstructured", "sparsity": 0.0, "scope": "layer", "end": 0.5, "min_keep": 0.001},
        {"type": "quant_lsq", "bits": 4, "start": 0.6, **formats}]}


def breakdown(manifest: dict) -> dict:
    """Bytes by kind for a manifest of either version (v1 keeps biases among the other tensors)."""
    kinds = dict.fromkeys(KINDS, 0)
    for rec in manifest["layers"].values():
        for part, p in rec["parts"].items():
            kinds[PART_KIND[part]] += p["bytes"]
    for key, rec in manifest["other_tensors"].items():
        is_bias = key.endswith(".bias") and key[:-5] in manifest["layers"]
        kinds["biases" if is_bias else "other"] += rec["bytes"]
    kinds["container"] = manifest["weights_file_bytes"] - sum(kinds.values())
    return kinds


def coding_comparison(model, spec) -> dict:
    """Per layer: bits per stored weight of values + indices, ours vs the baselines."""
    from jointcompress.artifact import baselines
    from jointcompress.artifact.encode import integer_weights
    from jointcompress.artifact.layer_codec import encode_layer

    out = {}
    for name, ls in spec.layers.items():
        q, _ = integer_weights(name, model.get_submodule(name).weight, ls)
        k = max(1, int((q != 0).sum()))
        dc = baselines.deep_compression_bytes(q, ls.bits)
        out[name] = {"numel": int(q.size), "nonzero": k, "density": k / q.size,
                     "ours": 8 * encode_layer(q, ls.bits).nbytes / k,
                     "deep_compression_huffman": 8 * dc["total"] / k, "dc_index_bits": dc["index_bits"],
                     "zstd_only": 8 * baselines.zstd_only_bytes(q, ls.bits) / k,
                     "iid_entropy_bound": 8 * baselines.entropy_bound_bytes(q, ls.bits) / k}
    return out


def worker(args: dict) -> dict:
    """One side of one point, in the code version on sys.path."""
    import torch

    from jointcompress.artifact import save
    from jointcompress.data import accuracy, load_dataset
    from jointcompress.models import build_model
    from jointcompress.recipe import parse_recipe
    from jointcompress.targets import Candidate, TargetError, allocate_size, sparsity_at_quant_start

    torch.set_num_threads(args["threads"])
    split = load_dataset(args["data"])
    model = build_model(args["model"], image_size=split.image_size, num_classes=split.num_classes)
    model.load_state_dict(torch.load(args["teacher"], weights_only=True))
    r = parse_recipe(recipe(args["model"], args["ratio"], args["formats"]))
    example = split.x_train[:2]
    t0 = time.perf_counter()
    try:
        alloc = allocate_size(model, r, example)
    except TargetError as exc:
        return {"reachable": False, "reason": str(exc)}
    prune, quant = r.technique("prune_unstructured"), r.technique("quant_lsq")
    at_start = sparsity_at_quant_start(quant.start, (prune.start, prune.end), prune.schedule)
    cand = Candidate(model, list(alloc.bits), list(alloc.bits), quant.per_channel, at_start)
    for key, value in args["formats"].items():  # the allocator's own candidate has the recipe's formats
        setattr(cand, {"scale_format": "step_format"}.get(key, key), value)
    built, spec = cand.build(alloc.sparsity, alloc.bits)
    manifest = save(built, spec, args["out"], example_inputs=example)
    kinds = breakdown(manifest)
    nonzero = sum(int(rec.get("nonzero", 0)) for rec in manifest["layers"].values())
    res = {"reachable": True, "predicted_bytes": alloc.bytes, "target_bytes": alloc.target_bytes,
           "file_bytes": manifest["weights_file_bytes"], "breakdown": kinds,
           "share_values_indices": (kinds["values"] + kinds["indices"]) / manifest["weights_file_bytes"],
           "nonzero": nonzero, "bits_per_stored_weight": 8 * (kinds["values"] + kinds["indices"]) / max(1, nonzero),
           "layer_sparsity": alloc.sparsity, "accuracy_no_finetune": accuracy(built, split.x_test, split.y_test),
           "allocate_s": time.perf_counter() - t0}
    if args["coding"]:
        res["coding_bits_per_stored_weight"] = coding_comparison(built, spec)
    return res


def train_recipe(model: str, ratio: float, formats: dict, epochs: int) -> dict:
    """The compare_mnist recipe (masks and 4-bit LSQ at overlapping times under the allocator's budgets, KD;
    mode: overlap, what mode: joint ran before joint_form.py) at a size target, with this side's formats."""
    return {"name": "artifact-bytes-train", "model": model, "mode": "overlap", "target": {"ratio": ratio},
            "techniques": [{"type": "prune_unstructured", "sparsity": 0.9, "end": 0.6, "regularization": 1.0,
                            "min_keep": 0.001},
                           {"type": "quant_lsq", "bits": 4, "start": 0.3, "regularization": 0.1, **formats},
                           {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7, "cache_teacher": True}],
            "training": {"epochs": epochs, "lr": 1e-3, "batch_size": 128},
            "coordination": {"strategy": "none", "every": 20, "log_every": 50}}


def train_worker(args: dict) -> dict:
    """Compress the teacher at the target (training on the first `train_images` images), save,
    and measure: accuracy at (nearly) equal bytes, the breakdown."""
    import torch

    from jointcompress.data import Split, load_dataset
    from jointcompress.models import build_model
    from jointcompress.pipeline import builder_for, compress_and_save
    from jointcompress.recipe import parse_recipe

    torch.set_num_threads(args["threads"])
    full = load_dataset(args["data"])
    n = args["train_images"]
    split = Split(full.x_train[:n], full.y_train[:n], full.x_test, full.y_test, full.name)
    teacher = build_model(args["model"], image_size=split.image_size, num_classes=split.num_classes)
    teacher.load_state_dict(torch.load(args["teacher"], weights_only=True))
    r = parse_recipe(train_recipe(args["model"], args["ratio"], args["formats"], args["epochs"]))
    from jointcompress.targets import TargetError

    try:
        outcome = compress_and_save("artifact", teacher, r, split, builder_for(args["model"], split), Path(args["out"]))
    except TargetError as exc:
        return {"reachable": False, "reason": str(exc)}
    manifest = json.loads((Path(args["out"]) / "artifact" / "manifest.json").read_text())
    kinds = breakdown(manifest)
    nonzero = sum(int(rec.get("nonzero", 0)) for rec in manifest["layers"].values())
    return {"reachable": True, "accuracy": outcome.row["accuracy"], "file_bytes": manifest["weights_file_bytes"], "breakdown": kinds,
            "nonzero": nonzero, "bits_per_stored_weight": 8 * (kinds["values"] + kinds["indices"]) / max(1, nonzero),
            "wall_s": outcome.row.get("wall_s")}


def train_teachers(data: str, epochs: int, where: Path, threads: int) -> dict[str, str]:
    import torch

    from jointcompress.data import accuracy, load_dataset
    from jointcompress.pipeline import train_teacher

    torch.set_num_threads(threads)
    split = load_dataset(data)
    paths = {}
    for name in sorted({m for m, _ in POINTS}):
        model = train_teacher(name, split, epochs, batch_size=128, seed=0)
        paths[name] = str(where / f"{name}.pt")
        torch.save(model.state_dict(), paths[name])
        print(f"teacher {name}: accuracy {accuracy(model, split.x_test, split.y_test):.4f}", flush=True)
    return paths


def old_source(commit: str, where: Path) -> Path:
    """The package source at `commit` (git archive), for the "before" side."""
    tar = where / "before.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar), commit, "src"], check=True)
    with tarfile.open(tar) as t:
        t.extractall(where / "before", filter="data")
    return where / "before" / "src"


def run_side(src: Path, job: dict, tmp: Path) -> dict:
    spec_file, out_file = tmp / "job.json", tmp / "result.json"
    spec_file.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, __file__, "--worker", str(spec_file), str(out_file)], check=True, env=env, cwd=ROOT)
    return json.loads(out_file.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=MNIST)
    ap.add_argument("--teacher-epochs", type=int, default=1)
    ap.add_argument("--before-commit", default="642f217")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "artifact_bytes.json")
    ap.add_argument("--train-epochs", type=int, default=0, help="also compress for real (0: allocator candidates only)")
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(train_worker(job) if job.get("train") else worker(job)))
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        teachers = train_teachers(args.data, args.teacher_epochs, tmp, args.threads)
        sources = {"before": old_source(args.before_commit, tmp), "after": ROOT / "src", "after-compact": ROOT / "src"}
        points = []
        for model, ratio in POINTS:
            point = {"model": model, "ratio": ratio, "sides": {}}
            for side, formats in SIDES.items():
                job = {"model": model, "ratio": ratio, "formats": formats, "teacher": teachers[model], "data": args.data,
                       "threads": args.threads, "out": str(tmp / f"{model}-{ratio:g}-{side}"), "coding": side != "before"}
                point["sides"][side] = res = run_side(sources[side], job, tmp)
                print(f"{model} {ratio:g}x {side}: " + (json.dumps({k: res[k] for k in (
                    "file_bytes", "breakdown", "nonzero", "bits_per_stored_weight", "accuracy_no_finetune")})
                    if res["reachable"] else "unreachable: " + res["reason"]), flush=True)
            if args.train_epochs and (model, ratio) in TRAIN_POINTS:
                point["trained"] = {}
                for side, formats in SIDES.items():
                    job = {"train": True, "model": model, "ratio": ratio, "formats": formats, "teacher": teachers[model],
                           "data": args.data, "threads": args.threads, "epochs": args.train_epochs,
                           "train_images": args.train_images, "out": str(tmp / f"train-{model}-{ratio:g}-{side}")}
                    try:
                        point["trained"][side] = res = run_side(sources[side], job, tmp)
                        print(f"{model} {ratio:g}x {side} trained: " + json.dumps(res), flush=True)
                    except subprocess.CalledProcessError as exc:  # e.g. the target is unreachable for this format
                        point["trained"][side] = {"error": f"worker failed ({exc.returncode}); see the log"}
            points.append(point)
    result = {"command": "PYTHONPATH=src .venv/bin/python benchmarks/artifact_bytes.py " + " ".join(sys.argv[1:]),
              "data": args.data, "teacher_epochs": args.teacher_epochs, "before_commit": args.before_commit,
              "threads": args.threads, "recipe": recipe("<model>", 0, {}), "points": points,
              "train_epochs": args.train_epochs, "train_images": args.train_images,
              "train_recipe": train_recipe("<model>", 0, {}, args.train_epochs),
              "wall_s": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

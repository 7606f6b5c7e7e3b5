"""Pool compare folders that ran the same point on disjoint seeds into one compare.json.

    .venv/bin/python benchmarks/pool_compare.py benchmarks/results/compare_lenet300_100x_paced_5seeds \\
        benchmarks/results/compare_lenet300_100x_paced_s5to9 --out benchmarks/results/compare_lenet300_100x_paced_10seeds

Why: a paired difference over 5 seeds has a wide standard error; a later batch of seeds
(compare_mnist.py --first-seed 5) extends it without re-running the first. Every seed trains
its own teacher and seeds its own runs, so seeds 5-9 run alone are the seeds 5-9 of a 10-seed
run. The pooled folder holds no runs of its own: each row's "dir" points (relative to it) at
the folder that really holds the run, the summary is recomputed over all rows with
jointcompress.compare.summarize, and each source's command is stored beside the pooling one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jointcompress.compare import plot_pareto, with_summary, write_csv
from jointcompress.errors import JointCompressError
from jointcompress.io import atomic_write_json
from jointcompress.recipe import with_added_fields

# what must agree for two folders to be one experiment (the seeds are what differ)
SAME_SETTING = ("kind", "model", "data", "ratios", "variants", "epochs", "teacher_epochs", "train_images", "recipe")


class PoolError(JointCompressError):
    """Folders that cannot be pooled: a different setting or overlapping seeds."""


def _seeds(result: dict) -> list[int]:
    return sorted({u["seed"] for u in result.get("uncompressed", [])} | {r["seed"] for r in result.get("runs", [])})


def _setting(result: dict, key: str):
    """What must agree between folders; a recipe field added since a folder ran (training.precision,
    training.micro_batches) counts at the value that run trained with (recipe.ADDED_FIELDS, as checkpoints read it)."""
    value = result.get(key)
    if key != "recipe" or not isinstance(value, dict):
        return value
    return with_added_fields(value)


def check_poolable(results: dict[Path, dict]) -> None:
    """Refuse to pool folders whose setting differs or whose seeds overlap (a seed counted twice
    would shrink the standard error for nothing)."""
    (first_dir, first), *others = results.items()
    for folder, result in others:
        for key in SAME_SETTING:
            if _setting(result, key) != _setting(first, key):
                raise PoolError(f"{folder}: its {key!r} differs from {first_dir}'s; pool only runs of one setting "
                                "(same command apart from --first-seed/--seeds/--out)")
    seen: dict[int, Path] = {}
    for folder, result in results.items():
        if result.get("seeds") != len(_seeds(result)):
            raise PoolError(f"{folder}: {result.get('seeds')} seeds asked, {len(_seeds(result))} ran; "
                            "pool only finished folders")
        for seed in _seeds(result):
            if seed in seen:
                raise PoolError(f"seed {seed} is in both {seen[seed]} and {folder}; pool folders with disjoint seeds")
            seen[seed] = folder


def pool(results: dict[Path, dict], out: Path, command: str) -> dict:
    """One compare result over every seed of `results` (folder -> its compare.json), with each
    run's dir made relative to `out` and the summary recomputed."""
    check_poolable(results)
    first = next(iter(results.values()))
    runs, uncompressed, unreachable = [], [], []
    for folder, result in results.items():
        to_source = Path(os.path.relpath(folder, out))
        runs += [{**row, "dir": str(to_source / row["dir"])} for row in result["runs"]]
        uncompressed += result.get("uncompressed", [])
        unreachable += result.get("unreachable", [])
    seeds = _seeds({"uncompressed": uncompressed, "runs": runs})
    pooled = {key: first.get(key) for key in SAME_SETTING}
    pooled.update({
        "seeds": len(seeds), "first_seed": seeds[0], "seed_list": seeds,
        "uncompressed": sorted(uncompressed, key=lambda u: u["seed"]),
        "runs": sorted(runs, key=lambda r: (r["ratio_target"], r["seed"], r["variant"])),
        "unreachable": sorted(unreachable, key=lambda u: (u["ratio_target"], u["seed"])),
        "wall_seconds": sum(r.get("wall_seconds") or 0.0 for r in results.values()),
        "reference": first.get("reference"), "command": command,
        "pooled_from": [{"folder": str(Path(os.path.relpath(folder, out))), "seeds": _seeds(result),
                         "command": result.get("command"), "wall_seconds": result.get("wall_seconds")}
                        for folder, result in results.items()],
    })
    if first.get("classes"):  # the data's (one setting, so one data set): chance, for the collapsed sides
        pooled["classes"] = first["classes"]
    return with_summary(pooled)  # as compare writes it: the summaries, each variant vs its baselines by seed


def write_pooled(folders: list[Path], out: Path, command: str) -> dict:
    """Read the folders' compare.json, pool them and write OUT/compare.json, compare.csv, pareto.png."""
    results = {}
    for folder in folders:
        path = folder / "compare.json"
        if not path.is_file():
            raise PoolError(f"{path}: no compare.json; give folders written by benchmarks/compare_mnist.py")
        results[folder] = json.loads(path.read_text())
    pooled = pool(results, out, command)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", pooled)
    write_csv(pooled["runs"], out / "compare.csv", pooled["unreachable"])
    reference = (pooled.get("reference") or {}).get("deep_compression")
    plot_pareto(pooled, out / "pareto.png", references=[tuple(reference)] if reference else None)
    return pooled


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", type=Path, nargs="+", help="compare folders of one setting, disjoint seeds")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    command = " ".join([".venv/bin/python benchmarks/pool_compare.py"] + (sys.argv[1:] if argv is None else argv))
    try:
        pooled = write_pooled(args.folders, args.out, command)
    except PoolError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{args.out}: {pooled['seeds']} seeds {pooled['seed_list']}, {len(pooled['runs'])} runs")


if __name__ == "__main__":
    main()

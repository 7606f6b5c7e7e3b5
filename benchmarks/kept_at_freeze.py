"""Where each joint variant put its weights: the kept weights of every budgeted layer when the decision
window froze (the size budget's `size_freeze` event in each stored run's history.json), per variant,
averaged over the seeds of the given result folders.

    .venv/bin/python benchmarks/kept_at_freeze.py compare_vit_30x_2k_obdrank compare_vit_30x_2k_obdland \
        compare_vit_30x_2k_obdtrack --out benchmarks/results/kept_at_freeze_vit_30x_2k.json

Why: two recipes can land on the same bytes with their weights in very different layers; the share of
each layer they keep says which layers the Fisher price (or its absence) stripped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def kept_at_freeze(history: dict) -> dict[str, int] | None:
    """Every budgeted layer's kept weights at the freeze, before its projection (None: no freeze recorded)."""
    freeze = next((e for e in history.get("events", []) if e.get("event") == "size_freeze"), None)
    return None if freeze is None else freeze.get("kept")


def by_variant(folders: list[str]) -> dict[str, dict]:
    """variant -> {"runs": [folder/run, ...], "kept_mean": {layer: mean kept weights}}."""
    runs: dict[str, list[tuple[str, dict[str, int]]]] = defaultdict(list)
    for folder in folders:
        for path in sorted((RESULTS / folder / "runs").glob("joint*/history.json")):
            kept = kept_at_freeze(json.loads(path.read_text()))
            if kept is not None:
                variant = path.parent.name.rsplit("-r", 1)[0]
                runs[variant].append((f"{folder}/{path.parent.name}", kept))
    out = {}
    for variant, found in runs.items():
        layers = found[0][1].keys()
        out[variant] = {"runs": [name for name, _ in found],
                        "kept_mean": {layer: round(statistics.mean(k[layer] for _, k in found), 1) for layer in layers}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="result folders under benchmarks/results")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    result = {"command": " ".join([".venv/bin/python benchmarks/kept_at_freeze.py"] + sys.argv[1:]),
              "variants": by_variant(args.folders)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for variant, v in result["variants"].items():
        print(f"{variant} ({len(v['runs'])} runs): " + ", ".join(f"{k} {m:g}" for k, m in v["kept_mean"].items()))


if __name__ == "__main__":
    main()

"""How far over its aim each stored joint run was when its decision window ended, read from the runs'
history.json (the size budget's `size_catch_up` events): the share over the aim at the first cut, the
cuts and the weights they dropped before the freeze, and the multiplier at the freeze.

    .venv/bin/python benchmarks/landing_excess.py --out benchmarks/results/landing_excess.json

A run that never needed a catch-up was on its aim (within 2%) when the window ended. The joint runs'
history.json files are committed for this (force-added: `runs/` is otherwise ignored).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def landing_of(history: dict) -> dict | None:
    """The first catch-up's excess, the cuts before the freeze and the multiplier there; None without a cut."""
    events = history.get("events", [])
    cuts = [e for e in events if e.get("event") == "size_catch_up"]
    if not cuts:
        return None
    freeze = next((e for e in events if e.get("event") == "size_freeze"), {})
    return {"excess": round(cuts[0]["bytes_before"] / cuts[0]["aim_bytes"] - 1, 4), "step": cuts[0]["step"],
            "cuts": len(cuts), "dropped_weights": sum(e["dropped_weights"] for e in cuts),
            "lambda_at_freeze": freeze.get("lambda")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    histories = sorted(RESULTS.glob("compare_*/runs/joint*/history.json"))
    runs = []
    for path in histories:
        landing = landing_of(json.loads(path.read_text()))
        if landing is not None:
            runs.append({"folder": path.parts[-4], "run": path.parts[-2], **landing})
    runs.sort(key=lambda r: -r["excess"])
    result = {"command": " ".join([".venv/bin/python benchmarks/landing_excess.py"] + sys.argv[1:]),
              "joint_runs": len(histories), "with_catch_up": len(runs), "runs": runs}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in runs[:12]:
        print(f"{r['excess']:+.0%} at step {r['step']}: {r['cuts']} cuts, {r['dropped_weights']} weights, "
              f"lambda {r['lambda_at_freeze']}  {r['folder']}/{r['run']}")
    print(f"{len(runs)} of {len(histories)} joint runs needed a catch-up")


if __name__ == "__main__":
    main()

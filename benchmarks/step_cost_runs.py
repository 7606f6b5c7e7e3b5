"""benchmarks/step_cost.py run several times, each in its own process, summarized per stepper.

    .venv/bin/python benchmarks/step_cost_runs.py --runs 5 -- --data ../shared/datasets/mnist/mnist.npz \
        --model lenet300 --threads 1 --batch 128 --rounds 30 --steps 10 \
        --out benchmarks/results/step_cost_runs.json

Why: on this machine a plain step's median moves by up to 15% from one process to the next
(3.3 to 4.1 ms on LeNet-300-100, where the tensors land in memory), and with it every ratio,
by about 0.1; the steppers interleaved within one process share that. So a ratio near a goal is
read over several processes: per stepper, each run's ratio to the plain step (medians) and their
mean ± standard error across runs. Everything after `--` goes to step_cost.py as it is (its
`--out` is this summary's path; each run's own result is kept beside it, `.runN.json`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run_once(args: list[str], out: Path) -> dict:
    """One step_cost.py process writing to `out`; its result."""
    cmd = [sys.executable, str(Path(__file__).with_name("step_cost.py")), *args, "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def summarize(results: list[dict]) -> dict:
    """Per stepper: every run's ratio to plain (medians), their mean and standard error."""
    out = {}
    for key in results[0]["ratio_to_plain"]:
        ratios = [r["ratio_to_plain"][key] for r in results]
        se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else None
        out[key] = {"ratios": ratios, "mean": statistics.mean(ratios), "standard_error": se,
                    "median_ms": [r["median_ms_per_step"][key] for r in results]}
        alone = [r["alone_ratio_to_plain"][key] for r in results if key in r.get("alone_ratio_to_plain", {})]
        if len(alone) == len(results) > 1:  # each stepper timed alone too (step_cost.py's check)
            out[key]["alone"] = {"ratios": alone, "mean": statistics.mean(alone),
                                 "standard_error": statistics.stdev(alone) / len(alone) ** 0.5}
    return out


def main() -> None:
    argv = sys.argv[1:]
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    inner = argparse.ArgumentParser(add_help=False)
    inner.add_argument("--out", default="benchmarks/results/step_cost_runs.json")
    known, rest = inner.parse_known_args(passed)
    summary_path = Path(known.out)
    results = [run_once(rest, summary_path.with_suffix(f".run{i}.json")) for i in range(args.runs)]
    result = {
        "command": f"python benchmarks/step_cost_runs.py --runs {args.runs} -- {' '.join(passed)}",
        "machines": [r["machine"] for r in results],
        "plain_median_ms": [r["median_ms_per_step"]["plain"] for r in results],
        "steppers": summarize(results),
        "targets": results[0]["targets"],
    }
    print(json.dumps({k: {"mean": v["mean"], "standard_error": v["standard_error"]}
                      for k, v in result["steppers"].items()}, indent=1))
    summary_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

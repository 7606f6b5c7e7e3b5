"""One honest way to time models, used by every latency the package or a benchmark prints.

Why each rule (measured on the 2-core development machine, issue 11):

* **Same thread count for every contender**, recorded with the result: a 2-thread PyTorch
  model against a 1-thread ONNX Runtime session is not a comparison of models.
* **ONNX Runtime sessions with that many intra-op threads, one inter-op thread and spinning
  off** (`session.intra_op.allow_spinning` / `session.inter_op.allow_spinning` = "0"): after
  each run, ORT's worker threads keep spinning by default and take the cores from whatever
  runs next. A small CNN in PyTorch, 1 thread, batch 1: 2.64 ms timed alone, 6.35 ms when its
  calls alternated with a default ORT session, 2.81 ms with a 1-thread, non-spinning session.
  Every session the package makes comes from `ort_session` below.
* **Warm-up, interleaved rounds, medians**: the machine is shared, so load drifts; rounds
  alternate the contenders (the starting one rotates each round) so a drift hits all alike,
  and medians ignore the odd preempted call.
* **Each contender also timed alone, as a check**: if a contender's interleaved median and
  its alone median differ by more than `tolerance` (20%), something in the interleaving
  (a spinning pool, a cache effect, a load burst) changed it, and the result flags it.
"""
from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

DEFAULT_THREADS = 1
TOLERANCE = 0.2  # interleaved vs alone median: more than 20% apart is flagged
SPINNING_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def ort_session_options(threads: int = DEFAULT_THREADS):
    """SessionOptions with `threads` intra-op threads, one inter-op thread and spinning off."""
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"threads must be >= 1 (got {threads})")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: its graph clean-up warns once per unused constant (a ReLU6's clips)
    for key in SPINNING_KEYS:
        opts.add_session_config_entry(key, "0")
    return opts


def ort_session(path: str | os.PathLike, threads: int = DEFAULT_THREADS):
    """The one factory for ONNX Runtime CPU sessions in jointcompress (see module docstring)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), ort_session_options(threads), providers=["CPUExecutionProvider"])


def session_threads(session) -> dict:
    """What a session was made with, read back from its options (for tests and records); a spinning key
    never set reads None (ONNX Runtime's default: spinning on)."""
    opts = session.get_session_options()
    return {"intra_op": opts.intra_op_num_threads, "inter_op": opts.inter_op_num_threads,
            **{key: _config_entry(opts, key) for key in SPINNING_KEYS}}


def _config_entry(opts, key: str) -> str | None:
    try:
        return opts.get_session_config_entry(key)
    except RuntimeError:  # "does not have configuration with key": never set
        return None


@dataclass
class Timing:
    """Medians in milliseconds per call, interleaved and alone, and which contenders disagree."""

    threads: int
    rounds: int
    warmup: int
    alone_runs: int
    interleaved_ms: dict[str, float]
    alone_ms: dict[str, float]
    flagged: list[str] = field(default_factory=list)
    tolerance: float = TOLERANCE
    method: str = ("same threads for all (torch.set_num_threads; ORT intra-op, inter-op 1, spinning off); "
                   "warm-up; interleaved rounds, rotating start; medians; each also timed alone as a check")
    machine: dict | None = None  # machine_info() where the times were taken (None: not recorded)

    def median(self, name: str) -> float:
        return self.interleaved_ms[name]

    def speedup(self, baseline: str) -> dict[str, float]:
        base = self.interleaved_ms[baseline]
        return {k: base / v for k, v in self.interleaved_ms.items() if v > 0}

    def to_dict(self) -> dict:
        return asdict(self)


def machine_info() -> dict:
    """The processor the times are taken on, recorded with them: the same model gives other times on another
    processor (ONNX Runtime's convolutions run in blocks of 16 channels with AVX-512 and of 8 without, so a
    narrow layer costs differently), and a loaded machine slows PyTorch more than small ORT models."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": _processor(), "cores": os.cpu_count(), "vector_isa": torch.backends.cpu.get_cpu_capability(),
            "load_average": load}


@functools.lru_cache(maxsize=1)
def _processor() -> str:
    """The CPU's model name (read once a process: every timing records it)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        return cpu


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def time_contenders(fns: dict[str, Callable[[], object]], threads: int = DEFAULT_THREADS, rounds: int = 30,
                    warmup: int = 5, alone_runs: int | None = None, tolerance: float = TOLERANCE) -> Timing:
    """Time every zero-argument callable the honest way; returns a `Timing`.

    PyTorch runs with `threads` intra-op threads for the duration (restored afterwards);
    ONNX Runtime contenders must come from `ort_session(path, threads)` with the same count.
    """
    if not fns:
        raise ValueError("time_contenders: no contenders given")
    check_sessions(fns, threads)
    alone_runs = alone_runs if alone_runs is not None else max(5, rounds // 2)
    names = list(fns)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                for name in names:
                    fns[name]()
            inter = _interleaved(fns, names, rounds)
            alone = {name: _alone(fns[name], alone_runs, warmup=max(1, warmup // 2)) for name in names}
    finally:
        torch.set_num_threads(before)
    inter_ms = {k: _median_ms(v) for k, v in inter.items()}
    alone_ms = {k: _median_ms(v) for k, v in alone.items()}
    return Timing(threads, rounds, warmup, alone_runs, inter_ms, alone_ms, flagged(inter_ms, alone_ms, tolerance), tolerance,
                  machine=machine_info())


def check_sessions(fns: dict[str, Callable[[], object]], threads: int) -> None:
    """Refuse a contender whose ONNX Runtime session (the `.session` of onnx_export.ort_predict and
    bound_predict) runs with other intra-op threads than every contender gets, or spins: the timing
    recorded `threads` for all of them while that one ran with its own (a default session takes every core,
    and its spinning threads slowed a PyTorch model timed beside it 2-3x)."""
    for name, fn in fns.items():
        session = getattr(fn, "session", None)
        if session is None or not callable(getattr(session, "get_session_options", None)):
            continue
        made = session_threads(session)
        spinning = [key for key in SPINNING_KEYS if made[key] != "0"]
        if made["intra_op"] != threads or spinning:
            count = f"{made['intra_op']} intra-op thread(s)" if made["intra_op"] else "its default threads (one per core)"
            raise ValueError(f"time_contenders: {name!r} runs an ONNX Runtime session with {count}"
                             f"{' and spinning on' if spinning else ''}, where every contender gets {threads} "
                             f"and no spinning; make its session with deploy.timing.ort_session(path, threads={threads})")


def steady_ms(call: Callable[[], object], threads: int = DEFAULT_THREADS, rounds: int = 30, repeats: int = 3,
              **options) -> float:
    """One contender's ms: the least of `repeats` medians (time_contenders; `options` pass on).
    Load only ever slows a call, so a spike inside one median cannot make a model look slower
    than it is (a 0.70 ms model once measured 0.78 ms under a spike and was never widened).
    For decisions (latency targets, allocations), not for reported results."""
    return min(time_contenders({"m": call}, threads=threads, rounds=rounds, **options).interleaved_ms["m"]
               for _ in range(max(1, repeats)))


def flagged(interleaved_ms: dict[str, float], alone_ms: dict[str, float], tolerance: float = TOLERANCE) -> list[str]:
    """Contenders whose interleaved median is more than `tolerance` away from their alone median."""
    return [k for k in interleaved_ms if alone_ms.get(k, 0) > 0 and abs(interleaved_ms[k] / alone_ms[k] - 1) > tolerance]


def _interleaved(fns, names: list[str], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        start = r % len(names)
        for name in names[start:] + names[:start]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def _alone(fn, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def on_machine(machine: dict | None) -> str:
    """" on <processor> (<vector instructions>, <cores> cores)" for a line that reports a time, or "" where the
    machine was not recorded."""
    if not machine:
        return ""
    return f" on {machine['cpu']} ({machine['vector_isa']}, {machine['cores']} cores)"


def describe(timing: Timing) -> str:
    """One line for logs and tables: the method, the threads and any flagged contender."""
    s = f"{timing.threads} thread(s), medians of {timing.rounds} interleaved rounds" + on_machine(timing.machine)
    if timing.flagged:
        s += (f"; interleaved vs alone differ > {100 * timing.tolerance:.0f}% for " + ", ".join(timing.flagged)
              + " (load changed during the run, or the contenders disturb each other: re-run)")
    return s

"""jointcompress vs Torch-Pruning (+ int8), side by side, at equal threads and equal accuracy.

What `jointcompress bench --against torch-pruning` and benchmarks/against_torch_pruning.py run:

1. The dense teacher (given, or trained here) is timed in PyTorch fp32 at batch 64; that time
   over `speedup` is the latency target.
2. **Ours**: per-group widths from a measured per-layer latency table (latency_targets,
   calibrated on ONNX Runtime fp32, the deployment runtime), then structured pruning to those
   widths + 8-bit LSQ + KD from the teacher in one joint run of `epochs` epochs; finalized
   (channels removed) and deployed in ONNX Runtime fp32 and int8 (QDQ, the trained scales) and
   in PyTorch FX int8 (x86), as Torch-Pruning's model is. With `drop_blocks`, those residual
   blocks go whole (block_drop): the widths are allocated for the model without them, and the
   joint run fades them into the identity (prune_blocks); `["auto"]` allocates with no block
   and with each droppable block dropped, and keeps the one predicted to lose least. `strides`
   ([1, 2]: as built and at stride 2) adds the stem's stride to those options (raise_stride:
   every later map a quarter the size), each block set allocated with each stride.
3. **Torch-Pruning**: its MagnitudePruner (L2, uniform per-layer ratio, its default) pruned in
   `tp_steps` steps up to `tp_max_ratio`, fine-tuned between steps with the same loss as ours
   (KD from the same teacher, same temperature and alpha, Adam, same lr and batch). The stages
   form its accuracy-vs-speed curve. The most pruned stage whose accuracy (on the selection
   images, as ours) matches ours, and the next more pruned one, then get the rest of the
   training budget, so each has had at least as many fine-tuning steps as ours; the fastest one
   that still matches is kept. Then PyTorch FX int8 (x86) and, in the same runtime as ours,
   ONNX Runtime fp32 and int8 (static QDQ, calibrated on training images). It starts from the
   dense teacher, or with `tp_start: "ours"` from the teacher reshaped as ours chose (stride
   raised, blocks dropped; not trained further): Torch-Pruning has neither option, and given
   them the two differ only in the channels they keep and how they train.
4. Every contender is timed at batch 1 and 64 (deploy.timing: the same threads, ORT intra-op
   threads, spinning off; interleaved rounds, medians, each also timed alone). Every ONNX
   Runtime fp32 contender, ours and Torch-Pruning's alike, is deployed the same way
   (deploy.ort_deploy: IOBinding; from batch 8 on the graph with its pooled convolutions
   folded, deploy.pooled_conv), and the result records each one's runtime settings.

Accuracy is on the whole test split. Every training-time choice (the teacher's kept epoch, the
allocator's held-out loss, our kept epoch, the matching) reads `select_images` training images held
out for it (at most a tenth of the training rows; a fixed draw, data.hold_out) that no contender
trains on, so no choice sees a test image.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import JointCompressError, UnsupportedModelError
from ..model_copy import load_model_state
from .timing import steady_ms, time_contenders

BASELINE = "dense_fp32_torch"
DENSE_ORT = "dense_fp32_ort"  # the uncompressed model deployed as ours is: the runtime's own share of a speed-up


@dataclasses.dataclass
class AgainstConfig:
    """Every knob of the comparison (recorded with its result)."""

    model: str = "lenet5"
    teacher_epochs: int | None = 8  # None in the results where the dense model was read from --teacher
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    speedup: float = 20.0
    tp_max_ratio: float = 0.9
    tp_steps: int = 6
    tp_round_to: int = 8  # Torch-Pruning's own round_to: kernel-friendly widths for it too (0: off)
    tp_global: bool = False  # Torch-Pruning's global_pruning (ranks channels across layers)
    select_images: int = 2000
    threads: int = 1
    runs: int = 40
    temperature: float = 4.0
    alpha: float = 0.7
    calibration_images: int = 2048
    min_width: int | None = None  # the allocator's floor per group (None: latency_targets.MIN_WIDTH)
    both_batches: bool = True  # the target's speed-up holds at batch 1 too (see allocate)
    widen_trials: int = 12  # measured widenings tried after the table's allocation (latency_targets.widen)
    narrow_trials: int = 36  # measured cuts tried when the table's allocation measures over (latency_targets.narrow)
    importance: str = "loss"  # what a cut loses for the allocator: "loss" (held-out, measured) or "norm" (L2)
    importance_steps: int = 100  # KD steps each cut copy is fine-tuned before its loss is measured (0: one-shot;
    # at most 1/16 of the training budget, so measuring ~16 cut copies costs at most one training run)
    importance_points: int = 6  # widths measured per group (linear in between)
    seed: int = 0  # our run's seed; Torch-Pruning's fine-tuning seeds are offset by it too
    target_ms: float | None = None  # the target in ONNX Runtime fp32 ms at batch 64 (None: dense's / speedup)
    torch_pruning: bool = True  # False: ours only (a sweep of our widths; Torch-Pruning's curve comes from a full run)
    # residual blocks ours removes whole (prune_blocks); ["auto"]: none or one droppable block, as the
    # allocator finds best
    drop_blocks: list[str] = dataclasses.field(default_factory=list)
    # the strides the allocator tries for `stride_layer` (raise_stride; 1: as built), each with every block set
    strides: list[int] = dataclasses.field(default_factory=lambda: [1])
    stride_layer: str | None = None  # None: the first stride-1 convolution (the stem)
    # Torch-Pruning's starting model: "teacher" (the dense model), or "ours": the teacher with the stride and
    # blocks ours chose (Torch-Pruning has neither option; given them, the comparison is of channel choices)
    tp_start: str = "teacher"


def require_torch_pruning():
    """The torch_pruning module, or a JointCompressError that says how to get it."""
    try:
        import torch_pruning
    except ImportError as exc:
        raise JointCompressError(
            "--against torch-pruning needs the Torch-Pruning package: pip install torch-pruning "
            f"(import failed: {exc})") from exc
    return torch_pruning


def check_supported(model: nn.Module, example: torch.Tensor) -> None:
    """Both contenders remove channels: the model needs prunable channel groups."""
    from ..graph import discover_groups

    try:
        groups = discover_groups(model, example)[0]
    except Exception as exc:
        raise UnsupportedModelError(f"--against torch-pruning: the model's channel groups could not be traced "
                                    f"({type(exc).__name__}: {exc}); use a Conv2d/Linear model") from exc
    if not groups:
        raise UnsupportedModelError("--against torch-pruning: the model has no prunable channel group "
                                    "(no Conv2d/Linear whose output channels can be removed); nothing to compare")


def matching_split(split, cfg: AgainstConfig):
    """`split` with `cfg.select_images` of its training rows held out for the choices (at most a tenth
    of them, so a small data set still trains on most of its rows): the same rows for every contender,
    for the teacher trained here too. A split held out already (by this function: bench --against holds out once,
    before the teacher) comes back as it is."""
    from ..data import hold_out

    if split.x_val is not None:
        return split
    n = min(cfg.select_images, len(split.y_train) // 10)
    if n < 1:
        raise JointCompressError(f"--against: {len(split.y_train)} training images leave none to hold out for the "
                                 "matching (it takes up to a tenth of them); give at least 10")
    if n < cfg.select_images:
        import warnings

        warnings.warn(f"--select-images {cfg.select_images}: {n} held out, a tenth of the {len(split.y_train)} "
                      "training images (the rest train)", stacklevel=2)
    return hold_out(split, n, what="--select-images")


def selection_split(split):
    """The held-out training images (matching_split) in the test rows' place: what choices read."""
    if split.x_val is None:
        raise JointCompressError("--against: the split has no held-out images to choose on (matching_split)")
    return dataclasses.replace(split, x_test=split.x_val, y_test=split.y_val)


def accuracy_of(fn, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of a model or deployed callable (a ModelOutput read as training reads it)."""
    from ..model_call import call_model
    from ..session.outputs import logits_of

    with torch.inference_mode():
        hits = sum(int((logits_of(call_model(fn, x[i:i + 1000])).argmax(-1).cpu() == y[i:i + 1000].cpu()).sum())
                   for i in range(0, len(x), 1000))
    return hits / len(x)


def alone_ms(fn, x: torch.Tensor, threads: int, rounds: int = 20, repeats: int = 1) -> float:
    """One contender's median ms on `x`; with `repeats`, the least of that many medians
    (deploy.timing.steady_ms), as the allocator's decisions take it."""
    return steady_ms(lambda: fn(x), threads, rounds, repeats, warmup=3, alone_runs=5)


def ort_fp32(model: nn.Module, path: Path, example: torch.Tensor, threads: int):
    """The package's ONNX Runtime fp32 deployment (deploy.ort_deploy); `.runtime` says how it runs."""
    from .ort_deploy import deploy_fp32

    return deploy_fp32(model, path, example, threads).predict()


def ort_int8(model: nn.Module, spec, split, example, workdir: Path, cfg: AgainstConfig):
    """ONNX Runtime int8 (QDQ) with the bound runner every ORT contender uses."""
    from .int8 import quantize_int8

    workdir.mkdir(parents=True, exist_ok=True)
    n = cfg.calibration_images
    int8 = quantize_int8(model, spec, (split.x_train[:n], split.y_train[:n]), example, workdir=workdir,
                         threads=cfg.threads)
    return int8_runner(int8.path, cfg.threads)


def torch_int8(model: nn.Module, spec, split, example, cfg: AgainstConfig):
    """PyTorch FX int8 (x86), calibrated on the first `calibration_images` training images."""
    from .int8 import quantize_int8

    n = cfg.calibration_images
    return quantize_int8(model, spec, (split.x_train[:n], split.y_train[:n]), example, backend="torch-x86")


def int8_runner(path: Path, threads: int):
    """The bound runner of an int8 (QDQ) ONNX file, with its `.runtime` record."""
    from .onnx_export import bound_predict, ort_session

    run = bound_predict(ort_session(path, threads))
    run.runtime = {"runtime": "onnxruntime CPU int8 (static QDQ), graph optimization level all, no folding",
                   "threads": threads, "spinning": "off", "io_binding": True}
    return run


def widths_of(model: nn.Module, example) -> dict[str, int]:
    from ..graph import discover_groups

    return {g.name: g.channels for g in discover_groups(model, example)[0]}


def steps_per_epoch(split, batch_size: int) -> int:
    return math.ceil(len(split.x_train) / batch_size)


# -- ours ------------------------------------------------------------------------------------

def our_recipe(alloc, cfg: AgainstConfig) -> dict:
    """Structured pruning to the allocation's widths + 8-bit LSQ + KD (+ the dropped blocks faded
    out over the same window), in one joint run."""
    blocks = [{"type": "prune_blocks", "blocks": list(cfg.drop_blocks), "end": 0.5}] if cfg.drop_blocks else []
    raised = stride_of(cfg)
    stride = [{"type": "raise_stride", "layer": cfg.stride_layer, "stride": raised}] if raised > 1 else []
    return {
        "mode": "joint",
        # BatchNorm evaluates with its running averages, as Torch-Pruning's fine-tuning (against_tp.fine_tune)
        # leaves its own: the same rule for both contenders
        "training": {"epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed,
                     "recalibrate_norms": 0},
        "coordination": {"strategy": "none", "every": 50},
        "techniques": [
            {"type": "prune_structured", "sparsity": min(0.99, alloc.overall_sparsity), "criterion": "magnitude",
             "scope": "layer", "end": 0.5,
             "layer_sparsity": {g: min(0.99, s) for g, s in alloc.layer_sparsity.items()}},  # 0.0 = keep all
            {"type": "quant_lsq", "bits": 8, "start": 0.3},
            {"type": "distill_kd", "temperature": cfg.temperature, "alpha": cfg.alpha, "cache_teacher": True},
            *blocks, *stride,
        ],
    }


def stride_of(cfg: AgainstConfig) -> int:
    """The one stride of a config allocate() has resolved (its `strides` narrowed to the chosen one)."""
    if len(cfg.strides) != 1:
        raise JointCompressError(f"strides: {cfg.strides} is a choice for the allocator; resolve it first (allocate)")
    return int(cfg.strides[0])


def reshapes(cfg: AgainstConfig) -> bool:
    """Whether a resolved config changes the teacher's structure (blocks dropped, stride raised)."""
    return bool(cfg.drop_blocks) or stride_of(cfg) > 1


def reshaped(teacher: nn.Module, example, cfg: AgainstConfig) -> nn.Module:
    """A copy of the teacher without `cfg.drop_blocks` and with its stride raised (the resolved
    config's), not trained further: Torch-Pruning's start with tp_start "ours"."""
    from ..block_drop import drop_blocks
    from ..strides import raise_stride

    model = drop_blocks(copy.deepcopy(teacher), list(cfg.drop_blocks))  # names checked by run_against / drop_options
    if stride_of(cfg) > 1:
        raise_stride(model, example, cfg.stride_layer, stride_of(cfg))
    return model.eval()


def recovered_base(teacher: nn.Module, split, example, cfg: AgainstConfig) -> nn.Module:
    """The teacher reshaped (without `cfg.drop_blocks`, its stride raised), recovered by KD from the
    whole teacher for 1/8 of the training budget, so the allocator's tables and measured importances
    describe the model that will be trained (at once, the small ResNet without its first block is at 7%)."""
    from .against_tp import fine_tune

    base = reshaped(teacher, example, cfg)
    fine_tune(base, teacher, split, drop_recovery_steps(split, cfg), cfg, seed=1000 * cfg.seed + 11)
    return base.eval()


def drop_recovery_steps(split, cfg: AgainstConfig) -> int:
    """KD steps that recover the reshaped teacher (blocks dropped, stride raised) before the allocator reads it."""
    return steps_per_epoch(split, cfg.batch_size) * cfg.epochs // 8 if reshapes(cfg) else 0


def drop_options(teacher: nn.Module, example, cfg: AgainstConfig) -> list[list[str]]:
    """The block sets to allocate for: the named ones, or with `drop_blocks: ["auto"]` none and
    each droppable block alone (block_drop.residual_blocks)."""
    if list(cfg.drop_blocks) != ["auto"]:
        return [list(cfg.drop_blocks)]
    from ..block_drop import residual_blocks

    return [[]] + [[b] for b in residual_blocks(teacher, example)]


def predicted_loss(importance, alloc) -> float | None:
    """The held-out loss the allocation is predicted to end at: the loss of the model it was cut
    from plus each group's measured rise at its width (None for channel norms, which have no loss)."""
    from ..width_importance import LossImportance

    if not isinstance(importance, LossImportance):
        return None
    return importance.base_loss + sum(importance.lost(g, alloc.channels[g], w) for g, w in alloc.widths.items())


def choose_drop(options: list[dict]) -> dict:
    """Among the options ({"blocks", "met", "measured_ms", "predicted_loss", ...}): the lowest
    predicted loss among those that met the target; when none met it, the fastest measured."""
    met = [o for o in options if o["met"]]
    if not met:
        return min(options, key=lambda o: o["measured_ms"])
    inf = float("inf")
    return min(met, key=lambda o: (inf if o["predicted_loss"] is None else o["predicted_loss"], o["measured_ms"]))


def allocate(teacher: nn.Module, split, example, work: Path, target_ms: float, cfg: AgainstConfig):
    """allocate_for every block set of drop_options with every stride of `cfg.strides`; returns
    (the config resolved to the option choose_drop picks, its allocation, a summary of every option)."""
    options, allocs = [], []
    for blocks in drop_options(teacher, example, cfg):
        for stride in dict.fromkeys(int(s) for s in cfg.strides):
            alloc, importance = allocate_for(teacher, split, example, work, target_ms,
                                             dataclasses.replace(cfg, drop_blocks=blocks, strides=[stride]))
            allocs.append(alloc)
            options.append({"blocks": blocks, "stride": stride, "widths": alloc.widths, "measured_ms": alloc.measured_ms,
                            "met": alloc.met, "predicted_loss": predicted_loss(importance, alloc)})
    chosen = choose_drop(options)
    resolved = dataclasses.replace(cfg, drop_blocks=chosen["blocks"], strides=[chosen["stride"]])
    return resolved, allocs[next(i for i, o in enumerate(options) if o is chosen)], options


def allocate_for(teacher: nn.Module, split, example, work: Path, target_ms: float, cfg: AgainstConfig):
    """Per-group widths for the target, confirmed on ONNX Runtime fp32, for the teacher without
    `cfg.drop_blocks`; returns the allocation and the importance it was ranked by.

    With `both_batches`, a shrunk model "measures" max(ms at batch 64, ms at batch 1 x dense's
    batch-64 / batch-1 ratio): under the target only if it is `speedup` x faster than dense
    PyTorch at both batch sizes (batch 1 is where per-call overheads, not MACs, dominate)."""
    from .. import latency_targets as lt
    from ..bench import batch_of
    from ..recipe import Target

    x1, x64 = batch_of(split.x_test, 1), batch_of(split.x_test, 64)
    base = recovered_base(teacher, split, example, cfg) if reshapes(cfg) else teacher
    table = lt.measure_table(base, example, 64, cfg.threads)
    scale = 0.0
    if cfg.both_batches:
        dense = {b: alone_ms(teacher, x, cfg.threads, repeats=3) for b, x in ((1, x1), (64, x64))}
        scale = dense[64] / dense[1]

    def deploy(m):
        run = ort_fp32(m, work / "probe.onnx", example, cfg.threads)
        ms64 = alone_ms(run, x64, cfg.threads, repeats=3)
        return max(ms64, scale * alone_ms(run, x1, cfg.threads, rounds=100, repeats=3)) if scale else ms64
    kwargs = {"min_width": cfg.min_width} if cfg.min_width is not None else {}
    importance = importance_for(base, split, example, cfg, **kwargs, teacher=teacher)
    alloc = lt.allocate_latency(base, example, Target(latency_ms=target_ms, batch=64), table=table, measure=deploy,
                                calibrate=True, max_rounds=5, importance=importance, **kwargs)
    if not alloc.met:  # the table's widths measure over the target: cut further, measured on the deployment
        alloc = lt.narrow(base, example, alloc, deploy, max_trials=cfg.narrow_trials, importance=importance, **kwargs)
    if cfg.widen_trials and alloc.met:
        alloc = lt.widen(base, example, alloc, deploy, max_trials=cfg.widen_trials, importance=importance, **kwargs)
    alloc.importance = importance.to_dict()
    return alloc, importance


def check_before_training(cfg: AgainstConfig, split, untrained: nn.Module) -> None:
    """What the comparison would refuse, checked on the untrained model before the dense one trains: its settings,
    the model (check_teacher) and a target no width reaches (floor_refusal)."""
    from ..bench import batch_of

    check_settings(cfg)
    check_teacher(untrained, batch_of(split.x_test, 2), cfg)
    refusal = floor_refusal(cfg, split, untrained)
    if refusal is not None:
        raise refusal


def floor_refusal(cfg: AgainstConfig, split, model: nn.Module) -> JointCompressError | None:
    """The refusal of a target the narrowest model ours may deploy misses (every channel group at its floor, the model
    as built), or None. A model's speed does not depend on its weights, so this is timed on the untrained model, as
    the allocation times its probes (ONNX Runtime fp32, alone, at batch 64, and at batch 1 scaled with
    `both_batches`): bench --against trained the dense model, the allocation and both contenders, minutes, then
    said "NOT met" for a target no width reaches, where compress refuses one in seconds. Refused only beyond
    latency_targets.TIMING_SLACK (a busy machine reads slow), and not with --drop-blocks or --strides, whose
    reshaped models are faster than any width of the model as built."""
    from .. import latency_targets as lt
    from ..bench import batch_of
    from ..graph import discover_groups
    from ..targets import TargetError

    if cfg.drop_blocks or any(int(s) != 1 for s in cfg.strides):
        return None
    model = model.eval()
    example, x1, x64 = (batch_of(split.x_test, n) for n in (2, 1, 64))
    dense = {b: alone_ms(model, x, cfg.threads, repeats=3) for b, x in ((1, x1), (64, x64))}
    goal = cfg.target_ms if cfg.target_ms is not None else dense[64] / cfg.speedup
    channels = {g.name: g.channels for g in discover_groups(model, example)[0]}
    widths = lt.floors(channels, **({"min_width": cfg.min_width} if cfg.min_width is not None else {}))
    with tempfile.TemporaryDirectory(prefix="jointcompress-floor-") as scratch:
        run = ort_fp32(lt.shrunk_to(model, example, widths), Path(scratch) / "floor.onnx", example, cfg.threads)
        ms = alone_ms(run, x64, cfg.threads, repeats=3)
        if cfg.both_batches:
            ms = max(ms, dense[64] / dense[1] * alone_ms(run, x1, cfg.threads, rounds=100, repeats=3))
    if ms <= goal * lt.TIMING_SLACK:
        return None
    asked = (f"--target-ms {cfg.target_ms:g}" if cfg.target_ms is not None
             else f"--speedup {cfg.speedup:g} (dense PyTorch {dense[64]:.3f} ms at batch 64, so {goal:.3f} ms)")
    return TargetError(f"--against: {asked} cannot be met by removing channels: the narrowest model ours may deploy "
                       f"(every channel group at its floor: {', '.join(f'{g} {w}' for g, w in widths.items())}) measured "
                       f"{ms:.3f} ms on ONNX Runtime fp32{' (batch 64, or batch 1 scaled)' if cfg.both_batches else ''}, "
                       f"over the target of {goal:.3f} ms, before anything trained. Ask for less "
                       f"({'a larger --target-ms' if cfg.target_ms is not None else 'a lower --speedup'}) or lower "
                       f"--min-width{f' (now {cfg.min_width})' if cfg.min_width is not None else ''}"
                       f"{_reshape_hint(model, example)}")


def _reshape_hint(model: nn.Module, example) -> str:
    """The reshaping options of bench --against this model has: a refusal of LeNet-5 advised --drop-blocks auto and
    --strides 1,2, of which it has neither (no residual block; raise_stride cannot stride its stem)."""
    from ..block_drop import residual_blocks
    from ..errors import JointCompressError
    from ..recipe import RaiseStride
    from ..strides import raise_stride

    options = ["--drop-blocks auto"] if residual_blocks(model, example) else []
    defaults = RaiseStride(type="raise_stride")
    try:
        raise_stride(copy.deepcopy(model), example, defaults.layer, defaults.stride)
        options.append("--strides 1,2")
    except JointCompressError:
        pass
    if not options:
        return (" (the model has no residual block to drop and no convolution raise_stride can stride: --drop-blocks "
                "and --strides do not apply)")
    return f", or let ours reshape the model ({', '.join(options)})"


def importance_for(model: nn.Module, split, example, cfg: AgainstConfig, min_width: int | None = None,
                   teacher: nn.Module | None = None):
    """The allocator's currency: the held-out loss (on the selection images) of `model` (the
    teacher, or the teacher without its dropped blocks) with each group cut to a few widths it
    may take, each cut copy first fine-tuned for `importance_steps` steps with the same KD loss
    (from `teacher`, default `model`) as every contender; or channel norms (`importance="norm"`).
    See width_importance for why recovered and not one-shot."""
    from .. import latency_targets as lt
    from ..graph import discover_groups
    from ..width_importance import loss_importance
    from .against_tp import fine_tune

    teacher = model if teacher is None else teacher
    groups = discover_groups(model, example)[0]
    if cfg.importance == "norm":
        return lt.relative_importance(model, groups)
    if cfg.importance != "loss":
        raise JointCompressError(f"importance: {cfg.importance!r} is unknown; use 'loss' or 'norm'")
    floor = lt.MIN_WIDTH if min_width is None else min_width
    options = {g.name: lt.allowed_widths(g.channels, lt.MIN_KEEP, floor) for g in groups}
    sel = selection_split(split)
    steps = min(cfg.importance_steps, steps_per_epoch(split, cfg.batch_size) * cfg.epochs // 16)
    recover = (lambda m: fine_tune(m, teacher, split, steps, cfg, seed=1000 * cfg.seed + 7)) if steps > 0 else None
    return loss_importance(model, example, groups, (sel.x_test, sel.y_test), options, recover, steps,
                           cfg.importance_points, recover_base=model is not teacher)


def ours(teacher: nn.Module, split, example, work: Path, target_ms: float, cfg: AgainstConfig) -> dict:
    """Allocate widths for the target on the deployment runtime, train jointly, deploy."""
    from ..api import compress
    from ..bench import count_macs
    from ..data import evaluator
    from ..finalize import finalize

    cfg, alloc, options = allocate(teacher, split, example, work, target_ms, cfg)
    model = copy.deepcopy(teacher)
    t0 = time.perf_counter()
    sel = selection_split(split)
    res = compress(model, our_recipe(alloc, cfg), (split.x_train, split.y_train), evaluator(sel.x_test, sel.y_test),
                   teacher=teacher)
    spec = finalize(model, res.example_inputs)
    train_s = time.perf_counter() - t0
    model.eval()
    runners = {"ours_fp32_torch": model, "ours_fp32_ort": ort_fp32(model, work / "ours_fp32.onnx", example, cfg.threads),
               "ours_int8_ort": ort_int8(model, spec, split, example, work / "ours_int8", cfg),
               # the runtime Torch-Pruning's int8 model gets, for ours too: the fastest at batch 64 for some widths
               "ours_int8_torch_x86": torch_int8(model, spec, split, example, cfg)}
    return {"runners": runners,
            "accuracy": {k: accuracy_of(f, split.x_test, split.y_test) for k, f in runners.items()},
            "selection_accuracy": accuracy_of(model, sel.x_test, sel.y_test),
            "widths": widths_of(model, example), "dropped_blocks": spec.dropped_blocks, "strides": spec.strides,
            "resolved": cfg,
            "drop_recovery_steps": drop_recovery_steps(split, cfg),
            "allocation": alloc.to_dict(), "drop_options": options, "train_seconds": train_s,
            "train_steps": steps_per_epoch(split, cfg.batch_size) * cfg.epochs, "macs": count_macs(model, example)}


# -- the comparison --------------------------------------------------------------------------

def dense_teacher(cfg: AgainstConfig, split, teacher_path: Path | None = None) -> tuple[nn.Module, str]:
    """The dense model: its weights from `teacher_path` (safetensors) when that file exists,
    else trained here for `teacher_epochs` (and saved there when a path is given)."""
    from ..pipeline import builder_for, train_teacher

    if teacher_path is not None and Path(teacher_path).is_dir():  # before the training it would be written after
        raise JointCompressError(f"--teacher {teacher_path}: a folder; give the dense model's weights file (safetensors), "
                                 "or a file name to train them into and keep them there")
    if teacher_path is not None and Path(teacher_path).is_file():
        from safetensors.torch import load_file

        model = builder_for(cfg.model, split)()
        try:
            load_model_state(model, load_file(str(teacher_path)))
        except (RuntimeError, OSError, ValueError) as exc:
            raise JointCompressError(f"--teacher {teacher_path}: not a {cfg.model} state dict in safetensors "
                                     f"({type(exc).__name__}: {exc}); pass the dense model's weights") from exc
        return model.eval(), f"loaded from {teacher_path}"
    # trained without the held-out rows, its best epoch chosen on them (split.selection())
    model = train_teacher(cfg.model, matching_split(split, cfg), cfg.teacher_epochs, lr=cfg.lr,
                          batch_size=cfg.batch_size).eval()
    if teacher_path is not None:
        from safetensors.torch import save

        from ..io import atomic_write_bytes

        atomic_write_bytes(teacher_path, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    return model, f"trained here ({cfg.teacher_epochs} epochs, lr {cfg.lr}, batch {cfg.batch_size}, seed 0)"


def check_strides(teacher: nn.Module, example, cfg: AgainstConfig) -> None:
    """Refuse bad `strides` / `stride_layer` / `tp_start` before any training (raise_stride on a copy)."""
    from ..strides import raise_stride

    if cfg.tp_start not in ("teacher", "ours"):
        raise JointCompressError(f"tp_start: {cfg.tp_start!r} is unknown; use 'teacher' or 'ours'")
    if not cfg.strides or any(not 1 <= int(s) <= 8 for s in cfg.strides):
        raise JointCompressError(f"strides: {cfg.strides} must list strides from 1 (as built) to 8, e.g. 1,2")
    for stride in {int(s) for s in cfg.strides} - {1}:
        raise_stride(copy.deepcopy(teacher), example, cfg.stride_layer, stride)


def tp_start_note(cfg: AgainstConfig, resolved: AgainstConfig) -> str:
    """What Torch-Pruning started from, for the result."""
    if cfg.tp_start == "teacher":
        return "the dense teacher"
    return (f"the teacher as ours reshaped it, untrained: blocks dropped {list(resolved.drop_blocks)}, "
            f"stride {stride_of(resolved)} at {resolved.stride_layer or 'the first stride-1 convolution'}")


def runtimes_of(runners: dict) -> dict:
    """How each contender runs: the ORT deployment's record (deploy.ort_deploy), else its kind."""
    return {k: getattr(f, "runtime", None) or (f"pytorch eager ({type(f).__name__})" if isinstance(f, nn.Module)
                                                else type(f).__name__) for k, f in runners.items()}


def time_all(runners: dict, split, threads: int, rounds: int) -> dict:
    """Every contender at batch 1 and 64, the honest way; speed-ups against dense fp32 PyTorch."""
    from ..bench import batch_of

    out = {}
    for bs in (1, 64):
        x = batch_of(split.x_test, bs)
        t = time_contenders({k: (lambda f=f: f(x)) for k, f in runners.items()}, threads=threads, rounds=rounds)
        out[f"batch{bs}"] = {"latency_ms": t.interleaved_ms, "alone_ms": t.alone_ms, "flagged": t.flagged,
                             "speedup_vs_dense_fp32_torch": t.speedup(BASELINE),
                             "speedup_alone_vs_dense_fp32_torch": {k: t.alone_ms[BASELINE] / v
                                                                    for k, v in t.alone_ms.items()},
                             "machine": t.machine}  # the processor the times were taken on (docs/latency.md)
    return out


def deployed_against_target(timing: dict, target_ms: float, both_batches: bool, speedup: float | None = None) -> dict:
    """The finished model (ours_fp32_ort) against the target, from the comparison's own timing run: the
    allocation's "met" is a probe taken before training, and a busy machine can read the deployed model
    over a target its probe met. Measured as the probe measures (alone medians; with `both_batches`,
    batch 1 scaled by dense PyTorch's batch-64 / batch-1 ratio of the same run), interleaved beside.
    A `speedup` target is judged against dense PyTorch of the same run (its alone median / speedup), as the
    table's speed-ups are: judged against the goal fixed at allocation, a table printed 4.1x beside "OVER"
    a 4x target when dense PyTorch read faster then than in the timing run."""
    ours = "ours_fp32_ort"
    alone64, inter64 = timing["batch64"]["alone_ms"][ours], timing["batch64"]["latency_ms"][ours]
    if both_batches:
        dense = {b: timing[f"batch{b}"]["alone_ms"][BASELINE] for b in (1, 64)}
        alone64 = max(alone64, dense[64] / dense[1] * timing["batch1"]["alone_ms"][ours])
    goal = target_ms if speedup is None else timing["batch64"]["alone_ms"][BASELINE] / speedup
    return {"deployed_ms": alone64, "deployed_interleaved_ms_b64": inter64, "deployed_goal_ms": goal,
            "deployed_met": alone64 <= goal}


def run_against(cfg: AgainstConfig, split, teacher: nn.Module | None = None, teacher_note: str = "given",
                workdir: Path | None = None, progress=None) -> dict:
    """The whole comparison (module docstring); a JSON-ready dict (no models in it).
    `progress(message)`: told when each phase starts (default: silent)."""
    say = progress or (lambda message: None)
    from ..bench import batch_of
    from .against_tp import torch_pruning

    require_torch_pruning()
    check_settings(cfg)
    t_start = time.perf_counter()
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="jointcompress-against-"))
    split = matching_split(split, cfg)
    if teacher is None:
        teacher, teacher_note = dense_teacher(cfg, split)
    teacher = teacher.eval()
    example = batch_of(split.x_test, 2)
    check_teacher(teacher, example, cfg)
    # the target's reference: the least of three medians, so a load spike cannot set it
    # dense PyTorch at batch 64 runs ~2x slower on a loaded machine (9.3 vs 19.5 ms, 1 thread) while
    # the small ORT models barely change: `target_ms` pins the target in the deployment runtime instead
    dense_ms = alone_ms(teacher, batch_of(split.x_test, 64), cfg.threads, repeats=3)
    target_ms = cfg.target_ms if cfg.target_ms is not None else dense_ms / cfg.speedup
    say(f"dense {dense_ms:.3f} ms at batch 64; target {target_ms:.3f} ms; ours: allocate, train, deploy")
    us = ours(teacher, split, example, work, target_ms, cfg)
    alloc = us["allocation"]
    met = (f"met: {alloc['measured_ms']:.3f} ms measured on the deployment" if alloc["met"] else
           f"NOT met: the narrowest model tried measured {alloc['measured_ms']:.3f} ms on the deployment")
    say(f"ours: target {target_ms:.3f} ms {met}; widths {us['widths']}, selection accuracy {us['selection_accuracy']:.4f}")
    start = reshaped(teacher, example, us["resolved"]) if cfg.tp_start == "ours" else None
    them = torch_pruning(teacher, split, example, work, cfg, us["selection_accuracy"], start) if cfg.torch_pruning else None
    if them is not None:
        say(f"Torch-Pruning: widths {them['widths']}, matched {them['matched']}; timing every contender")
    # the uncompressed model in the deployment runtime too: how much of a speed-up the runtime alone gives
    dense_ort = {DENSE_ORT: ort_fp32(teacher, work / "dense_fp32.onnx", example, cfg.threads)}
    runners = {BASELINE: teacher, **dense_ort, **us["runners"], **(them["runners"] if them else {})}
    them = them or {"accuracy": {}, "matched": None, "macs": None, "widths": None}
    timing = time_all(runners, split, cfg.threads, cfg.runs)
    return {**against_record(cfg, split, teacher, teacher_note, example, us, them, timing, runners, target_ms, dense_ms),
            "wall_seconds": time.perf_counter() - t_start,
            "workdir": str(work)}  # the ONNX files of every contender stay there (ours_fp32.onnx, tp_fp32.onnx)


def check_teacher(teacher: nn.Module, example, cfg: AgainstConfig) -> None:
    """What fails before any training: a model the comparison does not support, a block that
    cannot be dropped (by name; `auto` finds its own), a stride that cannot be raised."""
    check_supported(teacher, example)
    if cfg.drop_blocks and list(cfg.drop_blocks) != ["auto"]:
        from ..block_drop import check_droppable

        check_droppable(teacher, example, list(cfg.drop_blocks))
    check_strides(teacher, example, cfg)
    check_floor(teacher, example, cfg)


def check_settings(cfg: AgainstConfig) -> None:
    """Settings that failed deep in the run, after the dense model trained and was timed (a target of 0 ms: a
    pydantic traceback), or were ignored without a word (a stride layer with no stride to raise)."""
    if cfg.target_ms is not None and not cfg.target_ms > 0:
        raise JointCompressError(f"target_ms (--target-ms) {cfg.target_ms}: give the target in milliseconds, above 0")
    if cfg.stride_layer and set(cfg.strides) == {1}:
        raise JointCompressError(f"stride_layer (--stride-layer) {cfg.stride_layer!r} is read only with a stride above 1 "
                                 "to try: add one to strides (--strides 1,2), or leave the stride layer out")


def check_floor(teacher: nn.Module, example, cfg: AgainstConfig) -> None:
    """A floor (min_width) no channel group is wider than removed no channel, and the table compared the dense
    model with itself, without a word."""
    from ..graph import discover_groups

    if cfg.min_width is not None:
        widest = max((g.channels for g in discover_groups(teacher, example)[0]), default=0)
        if cfg.min_width >= widest:
            raise JointCompressError(f"min_width (--min-width) {cfg.min_width}: the widest channel group has {widest} "
                                     f"channels, so no channel could be removed; give at most {max(1, widest - 1)}")


def against_record(cfg: AgainstConfig, split, teacher: nn.Module, teacher_note: str, example, us: dict, them: dict,
                   timing: dict, runners: dict, target_ms: float, dense_ms: float) -> dict:
    """The JSON-ready record of one comparison (no models in it), less its wall time and folder."""
    from ..bench import count_macs

    alloc = us["allocation"]
    return {
        "config": dataclasses.asdict(cfg), "teacher": teacher_note, "threads": cfg.threads,
        "train_rows": len(split.x_train), "test_rows": len(split.x_test), "selected_on": split.selected_on,
        "target": {"latency_ms_b64": target_ms, "dense_fp32_torch_ms_b64_at_allocation": dense_ms, "speedup": cfg.speedup,
                   "met": alloc["met"], "measured_ms": alloc["measured_ms"],
                   "measured_as": "ONNX Runtime fp32 (deploy.ort_deploy), least of 3 alone medians: batch 64" +
                   (", or batch 1 x dense PyTorch's batch-64/batch-1 ratio if larger" if cfg.both_batches else ""),
                   **deployed_against_target(timing, target_ms, cfg.both_batches,
                                             cfg.speedup if cfg.target_ms is None else None)},
        "accuracy": {BASELINE: accuracy_of(teacher, split.x_test, split.y_test),
                     **{k: accuracy_of(runners[k], split.x_test, split.y_test) for k in (DENSE_ORT,) if k in runners},
                     **us["accuracy"], **them["accuracy"]},
        "match": {"ours_selection_accuracy": us["selection_accuracy"], "torch_pruning_matched": them["matched"],
                  "rule": "fastest Torch-Pruning stage whose selection accuracy >= ours after the full budget"},
        "timing": timing,
        "runtimes": runtimes_of(runners),
        "macs_per_sample": {"dense": count_macs(teacher, example), "ours": us["macs"], "torch_pruning": them["macs"]},
        "widths": {"dense": widths_of(teacher, example), "ours": us["widths"], "torch_pruning": them["widths"]},
        "torch_pruning_start": tp_start_note(cfg, us["resolved"]),
        "ours": {k: us[k] for k in ("allocation", "train_seconds", "train_steps", "dropped_blocks", "strides",
                                            "drop_recovery_steps", "drop_options")},
        "torch_pruning": {k: them.get(k) for k in ("matched", "chosen_step", "candidates", "stages", "train_seconds",
                                                   "train_steps")},
    }

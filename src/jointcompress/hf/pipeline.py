"""From an HF recipe to an exported, measured classifier, through the core joint loop.

`run_hf_recipe` is what `jointcompress compress RECIPE` runs when the recipe has an `hf:`
section (or `model: hf:NAME_OR_FOLDER`): load the fine-tuned teacher, build the student
(a subset of the teacher's layers, DistilBERT-style), tokenize the SST-2 style TSVs, run
`api.compress` (prune_heads / prune_ffn / quant_lsq / distill_kd jointly, one loop),
finalize (bake LSQ values, remove heads and neurons physically), export a standard HF
folder to OUT/hf_model, check `pipeline("text-classification")` loads it, then (int8=True,
the default) export ONNX and quantize it with ONNX Runtime dynamic int8 (OUT/onnx), measure
int8 dev accuracy, logits drift, bytes and 1-thread latency against the teacher, and write
OUT/summary.json and OUT/history.json. hf.trim_vocab first cuts the word-embedding matrix
(and the tokenizer saved in OUT/hf_model) to the word pieces the training text uses.

The packed artifact (OUT/artifact: LSQ integers + trained step sizes, the rest at
hf.ptq_bits) is written right after finalize and *loaded back*; the HF folder, the ONNX
models and every number after that come from the loaded artifact, so what is measured is
what was saved. The int8 ONNX model keeps the trained LSQ step sizes of every <= 8-bit layer.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Callable

from jointcompress.artifact.size import dense_fp32_bytes
from jointcompress.errors import ArtifactError
from jointcompress.hf import recipe_steps as steps
from jointcompress.hf.export import export_folder, folder_bytes, load_pipeline
from jointcompress.hf.recipe_steps import HFRun, split_files, teacher_source  # noqa: F401 - re-exported

EXAMPLE = "a gorgeous, witty, seductive movie."  # the exported pipeline's example where the dev file has no text
# max |logit diff| allowed between the int8 ONNX student and the finalized fp32 student. SST-2
# MiniLM students (logits of order +-4) measured 0.39-0.45 (benchmarks/results/hf_sst2.md).
INT8_ATOL = 1.0
NOTE = (
    "student.dev_accuracy: the finalized model before the artifact's post-training rounding of the weights "
    "LSQ did not train (hf.ptq_bits); artifact.dev_accuracy and everything after it: the model loaded back "
    "from OUT/artifact. folder_bytes: fp32 safetensors of OUT/hf_model (values on the quantization grids); the "
    "teacher's: its weights as one fp32 safetensors file, whatever its folder holds. "
    "int8 (OUT/onnx/model_int8.onnx) is ONNX Runtime dynamic int8 with the trained LSQ step sizes for the "
    "encoder Linears (ORT's own scales elsewhere); feed it input_ids / attention_mask (and token_type_ids for "
    "sentence pairs) padded to exactly seq_len with the tokenizer in OUT/onnx (its model_max_length is seq_len)"
)


def run_hf_recipe(
    recipe,
    out: Path,
    data_dir: str | Path | None,
    weights: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    callbacks: list | None = None,
    log: Callable[[str], None] = lambda msg: None,
    *,
    int8: bool = True,
    trim_vocab: bool | None = None,
    progressive: bool = False,
    int8_atol: float = INT8_ATOL,
    latency_rounds: int = 5,
    device=None,
    **compress_kwargs,
) -> dict:
    """Compress an HF text classifier with `recipe`; writes OUT/hf_model and OUT/summary.json.

    int8: also export OUT/onnx/model_fp32.onnx and OUT/onnx/model_int8.onnx (ONNX Runtime
    dynamic int8) and measure them (summary["int8"]); a logits drift above int8_atol is
    reported (within_tolerance false, and a note), not raised.
    trim_vocab: overrides hf.trim_vocab (keep only the word-embedding rows the training text
    uses; the HF folder and the artifact then carry the trimmed tokenizer, which ONNX needs).
    latency_rounds: interleaved rounds of the teacher / int8 latency measurement.
    progressive: instead of one run, prune the *teacher* first (the recipe's prune_*
    techniques, task loss, half the epochs, heads / neurons removed physically), then build
    the student from the pruned teacher's `hf.student_layers` and distil into it with the
    other techniques for the other half (jointcompress.progressive; single process, no
    checkpoints).
    device: where the student and the teacher train (a torch.device; default the CPU); the
    finalized student and the teacher come back to the CPU, where the artifact, the HF folder and the
    ONNX models are written and everything is measured.
    compress_kwargs go to api.compress (resume, checkpoint_every, max_nonfinite, ...); the
    run directory is `out` (checkpoints in OUT/checkpoints).

    Under torchrun (distributed="auto", the default) training is data-parallel: every rank
    takes its share of each global batch, masks and step sizes are decided on rank 0 and
    broadcast, and only rank 0 finalizes, writes and measures; the other ranks return a short
    dict (rank, metrics, steps, kept units per layer) once training ends.
    """
    from jointcompress import distributed as _dist
    from jointcompress.recipe import HF, parse_recipe

    recipe = parse_recipe(recipe)
    steps.check_recipe(recipe, progressive)
    run = HFRun(recipe, recipe.hf if recipe.hf is not None else HF(), Path(out), log)
    steps.load_models(run, weights, trim_vocab)
    steps.load_text(run, data_dir)
    if recipe.target is not None:
        from jointcompress.hf.size_target import plan

        run.measured["target"] = planned = plan(run)
        log(f"size target {planned['goal_bytes']:,} B: keeping " + ", ".join(
            f"{planned['kept'][k]} of {planned['total'][k]} {k.removeprefix('prune_')}" for k in planned["kept"])
            + f" (planned {planned['planned_bytes']:,} B)")
    dist = _dist.resolve(compress_kwargs.pop("distributed", "auto"))
    steps.train(run, dist, progress, callbacks, progressive, compress_kwargs, device=device)
    if dist is not None and not dist.is_main:  # rank 0 finalizes, exports and measures; the others are done
        return _other_rank(run, dist)
    steps.finalize_student(run, trim_vocab)
    steps.save_artifact(run)
    return _export_and_summarize(run, int8=int8, int8_atol=int8_atol, latency_rounds=latency_rounds,
                                 progressive=progressive, world=dist.world_size if dist is not None else 1)


def _other_rank(run: HFRun, dist) -> dict:
    r = run.result
    return {"rank": dist.rank, "world_size": dist.world_size, "metrics": r.metrics, "steps": _steps(r),
            "units_per_layer": {t.kind: [len(k) for k in t.kept()] for t in r.techniques if hasattr(t, "kept")}}


def _steps(result) -> int:
    return result.history.epochs[-1]["step"] if result.history.epochs else 0


def _stages(run) -> dict:
    """A progressive run's two trainings: the teacher's pruning (its steps and the pruned teacher's kept metrics,
    which the student then learned from) and the student's distillation; history.json holds the second."""
    return {"teacher_pruning": {"steps": _steps(run.stage1), "epochs": len(run.stage1.history.epochs),
                                "metrics": run.stage1.metrics, "selected_on": run.selected_on},
            "student": {"steps": _steps(run.result), "epochs": len(run.result.history.epochs),
                        "metrics": run.result.metrics, "selected_on": run.selected_on}}


@contextlib.contextmanager
def _tokenizer_up_to(tok, length: int | None):
    """The tokenizer with model_max_length at most `length` while it is saved (the model's positions for the HF
    folder, hf.max_length for the fixed-length ONNX models): the teacher's said 512 for a model of 128 positions,
    so pipeline(long_text, truncation=True) failed on a size mismatch, and padding="max_length" made rows the
    ONNX model refused."""
    before = getattr(tok, "model_max_length", None)
    if length is not None and (before is None or before > length):
        tok.model_max_length = length
    try:
        yield tok
    finally:
        tok.model_max_length = before


def _say_low_agreement(drift: dict, log) -> None:
    """The int8 model's top-1 class against the fp32 student's on the dev rows, said under the core int8 path's
    floor (deploy.int8.PARITY_AGREEMENT): the absolute logit tolerance passes small logits, and an int8 model that
    disagreed on 9% of the rows was said to be "ok"."""
    from jointcompress.deploy.int8 import PARITY_AGREEMENT

    if drift["argmax_agreement"] < PARITY_AGREEMENT:
        log(f"warning: int8 ONNX: the top-1 class differs from the fp32 student's on "
            f"{1 - drift['argmax_agreement']:.1%} of the dev rows (under {PARITY_AGREEMENT:.0%}), though the logits "
            "are within the tolerance; compare the int8 row's dev accuracy with the artifact's before deploying it "
            "(the fp32 student keeps its accuracy)")


def _export_and_summarize(run: HFRun, *, int8: bool, int8_atol: float, latency_rounds: int, progressive: bool,
                          world: int) -> dict:
    """The HF folder and its pipeline check, the int8 ONNX measurements, summary.json."""
    from jointcompress.io import atomic_write_json

    with _tokenizer_up_to(run.tok, steps.usable_positions(run.hf.config)) as tok:
        folder = export_folder(run.hf, tok, run.out / "hf_model")
    text = example_text(run.dev_data)
    example = load_pipeline(folder)(text)
    example = example[0] if isinstance(example, list) else example
    # the teacher's weights as one fp32 safetensors file, from the model itself: its folder's files counted a
    # Trainer checkpoint's optimizer.pt (12x "smaller" for 4x), a pytorch_model.bin as 0 B and fp16 files as fp32
    teacher_bytes = dense_fp32_bytes(run.teacher)
    student_bytes = folder_bytes(folder)
    int8_summary = None
    if int8:
        int8_summary = deploy_int8(run.hf, run.teacher, run.dev_t, run.out / "onnx", seq_len=run.hf_cfg.max_length,
                                   teacher_bytes=teacher_bytes, teacher_acc=run.teacher_acc, atol=int8_atol,
                                   rounds=latency_rounds, log=run.log, spec=run.spec)
        if not int8_summary["logits_vs_fp32_student"]["within_tolerance"]:
            run.warnings.append(int8_summary["logits_vs_fp32_student"]["message"])
        # the ONNX models' inputs come from this tokenizer: a folder without the pruned model's config, which asks
        # transformers' AutoTokenizer to run custom code (OUT/hf_model's does: a prompt, then a wait, in a terminal)
        with _tokenizer_up_to(run.tok, run.hf_cfg.max_length) as tok:  # the ONNX models' fixed length
            tok.save_pretrained(run.out / "onnx")
    teacher, student = steps.model_summary(run, folder, student_bytes, teacher_bytes)
    final_acc, ta = run.measured["final_acc"], run.teacher_acc
    artifact = steps.artifact_summary(run, teacher_bytes)
    target = artifact.get("target")
    if target is not None and not target["met"]:
        missed = (f"size target missed: the weights file is {target['weights_bytes']:,} B, "
                  f"{target['weights_bytes'] / target['goal_bytes'] - 1:.1%} over the {target['goal_bytes']:,} B target "
                  f"(planned {target['planned_bytes']:,} B: training moved the coded bytes more than the plan's margin); "
                  "ask for a slightly smaller file (a higher target.ratio) to land under it")
        run.warnings.append(missed)
        warnings.warn(missed, stacklevel=2)
    summary = {
        "recipe": run.recipe.name, "teacher": teacher, "student": student,
        "artifact": artifact,
        "accuracy_ratio_vs_teacher": final_acc / ta if ta else None,
        "size_ratio_vs_teacher": (teacher_bytes / student_bytes) if teacher_bytes and student_bytes else None,
        "train_rows": len(run.train_data), "dev_rows": len(run.dev_data), "world_size": world, "progressive": progressive,
        "selected_on": run.selected_on,
        "steps": _steps(run.result) + (_steps(run.stage1) if run.stage1 is not None else 0),
        **({"stages": _stages(run)} if run.stage1 is not None else {}),
        "techniques": {k: v for r in (run.stage1, run.result) if r is not None for k, v in r.summary().items() if "." in k},
        "pipeline_example": {"text": text, **example},
        "int8": int8_summary,
        "notes": [NOTE] + run.warnings,
        "wall_seconds": time.perf_counter() - run.t0,
    }
    atomic_write_json(run.out / "history.json", run.result.history.as_dict())
    atomic_write_json(run.out / "summary.json", summary)
    return summary


def example_text(data) -> str | dict:
    """The exported pipeline's example: the first dev row (the user's own task, not SST-2's), as
    the text-classification pipeline takes it ({"text", "text_pair"} for a sentence pair)."""
    if not len(data):
        return EXAMPLE
    return data.sentences[0] if data.pairs is None else {"text": data.sentences[0], "text_pair": data.pairs[0]}


# dev rows per call when int8 accuracy is measured: ONNX Runtime's dynamic int8 sets the activations' scales from
# each call's batch, so a row's logits (and, near a tie, its class) depend a little on the rows beside it
INT8_EVAL_BATCH = 64


def deploy_int8(hf, teacher, dev_t: dict, onnx_dir: Path, *, seq_len: int, teacher_bytes: int | None,
                teacher_acc: float | None, atol: float = INT8_ATOL, rounds: int = 5,
                log: Callable[[str], None] = lambda msg: None, spec=None) -> dict:
    """ONNX export + ONNX Runtime dynamic int8 of the finalized student, and its measurements.

    Writes onnx_dir/model_fp32.onnx and onnx_dir/model_int8.onnx; returns int8 dev accuracy,
    logits drift vs the fp32 student (checked against atol, reported not raised), bytes, and
    1-thread latency at batch 1 / 32 of the teacher (torch fp32) and the int8 student (ORT).
    """
    from jointcompress.hf.int8 import (OrtClassifier, check_logits, export_onnx, interleaved_latency, logits_over, quantize_onnx_int8,
                                       torch_logits_fn, trained_overrides)

    onnx_dir = Path(onnx_dir)
    from jointcompress.hf.wrapper import pair_types

    dev = {k: dev_t[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in dev_t}
    fp32 = export_onnx(hf, onnx_dir / "model_fp32.onnx", seq_len=seq_len, token_types=pair_types(dev) is not None)
    trained = trained_overrides(fp32, hf, spec)
    q = quantize_onnx_int8(fp32, onnx_dir / "model_int8.onnx", trained)
    ort = OrtClassifier(q, threads=1)
    ref = logits_over(torch_logits_fn(hf.eval()), dev, batch_size=INT8_EVAL_BATCH)
    got = logits_over(ort, dev, batch_size=INT8_EVAL_BATCH)
    try:
        drift = check_logits(ref, got, atol=atol)
        drift.update(within_tolerance=True)
    except ArtifactError as e:
        drift = check_logits(ref, got, atol=math.inf)
        drift.update(atol=atol, within_tolerance=False, message=str(e))
        log(f"warning: {e}")
    _say_low_agreement(drift, log)
    labels = dev_t["labels"]
    acc = float((got.argmax(-1) == labels).float().mean()) if len(labels) else 0.0
    int8_bytes = q.stat().st_size
    lat = interleaved_latency(
        {"teacher_fp32_torch": (torch_logits_fn(teacher.eval()), teacher.config.vocab_size),
         "student_int8_onnx": (ort, hf.config.vocab_size)}, seq_len, rounds)
    t, s = lat["teacher_fp32_torch"], lat["student_int8_onnx"]
    for bs in (1, 32):
        lat[f"speedup_b{bs}"] = round(t[f"batch{bs}_ms"] / s[f"batch{bs}_ms"], 2) if s[f"batch{bs}_ms"] else None
    lat.update(threads=1, seq_len=seq_len, rounds=max(1, rounds), inputs="random ids, full-length rows")
    out = {
        "backend": "onnxruntime dynamic int8 (per-channel int8 weights, int8 activations at run time), CPU",
        "weights_with_trained_scales": len(trained),
        "onnx_fp32": str(fp32), "onnx_int8": str(q),
        "dev_accuracy": acc,
        "evaluated_in_batches_of": INT8_EVAL_BATCH,  # dynamic int8 scales each batch's activations by that batch
        "accuracy_ratio_vs_teacher": acc / teacher_acc if teacher_acc else None,
        "logits_vs_fp32_student": drift,
        "int8_onnx_bytes": int8_bytes, "fp32_onnx_bytes": fp32.stat().st_size,
        "teacher_fp32_bytes": teacher_bytes,
        "size_ratio_vs_teacher": teacher_bytes / int8_bytes if teacher_bytes else None,
        "latency": lat,
    }
    log(f"int8 ONNX: dev accuracy {acc:.4f}, max |logit diff| vs fp32 student {drift['max_abs_diff']:.4f} "
        f"(tolerance {atol}), {int8_bytes:,} bytes")
    return out


def cli_compress(recipe, recipe_path: Path, *, out: Path, data, weights, force: bool, resume: bool,
                 checkpoint_every: int, max_nonfinite: int, console, progress_bar, tracked, device: str = "cpu",
                 flags: dict | None = None) -> None:
    """The `jointcompress compress` path for HF recipes (data-parallel under torchrun; rank 0 writes);
    `device`: --device, where the student and the teacher train; `flags`: the command line's overrides of the
    recipe file, which the run folder's recipe.yaml records."""
    import contextlib

    from rich.table import Table

    from jointcompress.cli import SayResumed
    from jointcompress.devices import resolve_device
    from jointcompress.distributed import init_from_env, quiet_other_ranks
    from jointcompress.io import RUN_OUTPUTS, RUN_REPORT, atomic_write_text, finished_run, prepare_run_dir, say_finished
    from jointcompress.recipe import recipe_as_run

    steps.refuse_causal_lm(teacher_source(recipe, weights))  # a wrong teacher or data folder, found before --force clears
    split_files(data or recipe.data)
    dist = init_from_env()
    quiet_other_ranks(dist)
    where = resolve_device(device)  # after joining the group: under torchrun, `cuda` is the rank's own GPU
    main_rank = dist is None or dist.is_main
    out = prepare_run_dir(out, force=force, resume=resume, dist=dist,
                          fresh=("checkpoints", "hf_model", "onnx", *RUN_OUTPUTS, *RUN_REPORT),
                          reads={"--weights": weights, "the recipe": recipe_path})
    if resume and finished_run(out):
        if main_rank:
            say_finished(out, console, "artifact", recipe, hf_folder="hf_model")
        return
    with progress_bar() if main_rank else contextlib.nullcontext() as bar:
        summary = run_hf_recipe(
            recipe, out, data, weights, progress=tracked(bar, recipe.mode) if main_rank else None,
            log=console.print if main_rank else (lambda msg: None), resume=resume, checkpoint_every=checkpoint_every,
            max_nonfinite=max_nonfinite, distributed=dist if dist is not None else False, device=where,
            callbacks=[SayResumed()] if resume and main_rank else None,
        )
    if not main_rank:
        return
    t, s = summary["teacher"], summary["student"]
    table = Table(title=f"{recipe.name} (HF, {summary['train_rows']} train rows, {summary['dev_rows']} dev rows)")
    q = summary.get("int8")
    cols = ["", "dev accuracy", "layers", "heads", "FFN neurons", "bytes"]
    if q:
        cols += ["b1 ms", "b32 ms"]
    for col in cols:
        table.add_column(col, justify="left" if col == "" else "right")
    fmt = lambda b: "-" if b is None else f"{b:,}"  # noqa: E731
    lat = q["latency"] if q else {}
    tl, sl = lat.get("teacher_fp32_torch", {}), lat.get("student_int8_onnx", {})
    extra = lambda d: [f"{d['batch1_ms']:.2f}", f"{d['batch32_ms']:.2f}"] if q else []  # noqa: E731
    table.add_row("teacher fp32 (torch)", f"{100 * t['dev_accuracy']:.2f}%", str(t["layers"]), str(t["heads"]),
                  str(t["ffn_neurons"]), fmt(t["folder_bytes"]), *extra(tl))
    table.add_row(f"{recipe.mode} student fp32", f"{100 * s['dev_accuracy']:.2f}%", str(s["layers"]),
                  str(sum(s["heads_per_layer"])), str(sum(s["intermediate_per_layer"])), fmt(s["folder_bytes"]),
                  *(["-", "-"] if q else []))
    a = summary["artifact"]
    table.add_row(f"{recipe.mode} student, packed artifact", f"{100 * a['dev_accuracy']:.2f}%", str(s["layers"]),
                  str(sum(s["heads_per_layer"])), str(sum(s["intermediate_per_layer"])), fmt(a["bytes"]["model"]),
                  *(["-", "-"] if q else []))
    if q:
        table.add_row(f"{recipe.mode} student int8 (ORT)", f"{100 * q['dev_accuracy']:.2f}%", str(s["layers"]),
                      str(sum(s["heads_per_layer"])), str(sum(s["intermediate_per_layer"])),
                      fmt(q["int8_onnx_bytes"]), *extra(sl))
    console.print(table)
    if q:
        d = q["logits_vs_fp32_student"]
        ratio = q["size_ratio_vs_teacher"]
        console.print(
            f"int8 vs fp32 student: max |logit diff| {d['max_abs_diff']:.4f} (tolerance {d['atol']}: "
            f"{'ok' if d['within_tolerance'] else 'EXCEEDED'}), argmax agreement {100 * d['argmax_agreement']:.1f}%; "
            f"size vs teacher {'-' if ratio is None else f'{ratio:.1f}x'}, speedup b1 {lat['speedup_b1']}x, "
            f"b32 {lat['speedup_b32']}x (1 thread, seq len {lat['seq_len']}, median of {lat['rounds']} interleaved rounds)")
        console.print(f"int8 ONNX model: {q['onnx_int8']}", markup=False)
    if a.get("target"):
        tg = a["target"]
        console.print(f"size target {tg['goal_bytes']:,} B ({tg['teacher_fp32_bytes'] / tg['goal_bytes']:.1f}x the teacher's "
                      f"fp32 weights): weights file {tg['weights_bytes']:,} B ({tg['ratio_reached']:.1f}x), "
                      f"{'met' if tg['met'] else 'MISSED'}")
    atomic_write_text(out / "recipe.yaml", recipe_as_run(recipe_path, recipe, flags or {}))
    art_ratio, parts = a["size_ratio_vs_teacher"], a["bytes"]
    ratio_a = "" if art_ratio is None else (
        f"together {art_ratio:.1f}x smaller than the teacher's model file"
        + (" (the size target counts the weights file alone)" if a.get("target") else "") + "; ")
    console.print(f"packed artifact in {a['path']} (weights file {parts['weights']:,} B + manifest "
                  f"{parts['manifest']:,} B, {ratio_a}load with jointcompress.hf.artifact.load_hf_artifact)", markup=False)
    console.print(f"HF model folder in {out / 'hf_model'} (loads with pipeline('text-classification', model=...) "
                  "after `import jointcompress.hf`, or with trust_remote_code=True)", markup=False)

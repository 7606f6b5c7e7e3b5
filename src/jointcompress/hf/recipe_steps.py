"""The steps of an HF recipe run, one job each: models, data, training (through the
compression session's built-in loop), finalize, the packed artifact, the summary.

hf/pipeline.py:run_hf_recipe chains them; each step reads and fills an HFRun.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from jointcompress.errors import ArtifactError, DataError, RecipeError, UnsupportedModelError
from jointcompress.hf.data import FORMATS, TextDataset, read_rows, tokenize
from jointcompress.hf.ffn import ffn_widths
from jointcompress.hf.heads import head_counts
from jointcompress.hf.load import (DEFAULT_LABELS, MINILM_NAME, folder_config, load_classifier, load_tokenizer,
                                   teacher_labels)
from jointcompress.hf.pruned import n_layers
from jointcompress.hf.student import make_student
from jointcompress.hf.wrapper import SequenceClassifier, accuracy, pack_tokens, tensor_loader


@dataclass
class HFRun:
    """What the steps of one HF recipe run share."""

    recipe: Any
    hf_cfg: Any
    out: Path
    log: Callable[[str], None]
    t0: float = field(default_factory=time.perf_counter)
    src: str = ""
    warnings: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # the classes' names in index order (class_names)
    tok: Any = None
    teacher: Any = None
    student: Any = None
    train_data: TextDataset | None = None
    dev_data: TextDataset | None = None
    dev_t: dict | None = None
    x_dev: torch.Tensor | None = None
    y_dev: torch.Tensor | None = None
    # training rows held out to choose the kept epoch on (training.validation_images); None: the dev rows
    x_sel: torch.Tensor | None = None
    y_sel: torch.Tensor | None = None
    selected_on: str = "dev"
    teacher_acc: float | None = None
    stage1: Any = None
    result: Any = None
    hf: Any = None
    spec: Any = None
    measured: dict = field(default_factory=dict)


def teacher_source(recipe, weights: str | Path | None) -> str:
    """--weights, else hf.model_name_or_path, else `model: hf:NAME`; a clear error if none."""
    src = weights or (recipe.hf.model_name_or_path if recipe.hf is not None else None)
    if src is None and (recipe.model or "").startswith("hf:"):
        src = recipe.model[3:]
    if not src:
        raise RecipeError(
            "HF recipe: no teacher; pass --weights FOLDER (a fine-tuned sequence classifier, e.g. the one "
            "`benchmarks/hf_sst2.py teacher` saves to runs/hf_teacher) or set hf.model_name_or_path"
        )
    src = str(src)
    if src != MINILM_NAME and not Path(src).is_dir():
        raise ArtifactError(f"teacher {src!r} is not a folder; give a folder with config.json, weights and tokenizer files")
    if src != MINILM_NAME and not (Path(src) / "config.json").is_file():
        raise ArtifactError(f"teacher {src!r} has no config.json, so it is no Hugging Face model folder; give the folder "
                            "save_pretrained wrote for a fine-tuned sequence classifier (config.json, weights, tokenizer "
                            f"files){_exported_beside(Path(src))}")
    return src


def _exported_beside(folder: Path) -> str:
    """Where --weights names a transformers run's artifact (OUT/artifact, as the CLI's own models take it), the run's
    exported model beside it (OUT/hf_model) is the folder a next run starts from: said, not left to be found."""
    exported = folder.parent / "hf_model"
    if (folder / "manifest.json").is_file() and (exported / "config.json").is_file():
        return f"; {folder} is a run's artifact, and the model that run exported beside it is: --weights {exported}"
    return ""


def split_files(data_dir: str | Path | None) -> tuple[Path, Path]:
    """The folder's training and evaluation files: train.<ext> and dev.<ext> (GLUE's names) or
    validation.<ext> (the `datasets` library's), <ext> one of hf.data.FORMATS."""
    looked = f"train and dev (or validation) files, each {' / '.join(FORMATS)} with a header (or hf.columns)"
    if not data_dir:
        raise DataError(f"HF recipe: no data; pass --data DIR holding {looked} (or set `data:`)")
    d = Path(data_dir)
    if not d.is_dir():
        what = "a file" if d.is_file() else "no such folder"
        raise DataError(f"--data {d}: {what}; an hf: recipe reads a folder with {looked}")
    found = []
    for stems in (("train",), ("dev", "validation")):
        files = [d / f"{stem}{ext}" for stem in stems for ext in FORMATS if (d / f"{stem}{ext}").is_file()]
        if len(files) != 1:
            what = "none" if not files else " and ".join(f.name for f in files) + ": one only"
            raise DataError(f"{d}: {'/'.join(stems)} file: {what}; --data must be a folder with {looked}")
        found.append(files[0])
    return found[0], found[1]


def class_names(hf_cfg, src: str) -> list[str]:
    """hf.labels, else the teacher's own class names, else NEGATIVE / POSITIVE (a base encoder's
    new head); a count that disagrees with the teacher's classifier is refused here, not by
    transformers' size-mismatch traceback."""
    own = teacher_labels(src)
    if hf_cfg.labels is None:
        return own or list(DEFAULT_LABELS)
    if own is not None and len(own) != len(hf_cfg.labels):
        raise RecipeError(f"hf.labels names {len(hf_cfg.labels)} classes {hf_cfg.labels}, but the teacher's classifier "
                          f"has {len(own)} outputs {own}; remove hf.labels to take the teacher's, or list {len(own)} names")
    if own is not None and set(own) == set(hf_cfg.labels) and list(own) != list(hf_cfg.labels):
        # the head's output i stays the teacher's class i: renamed by position, every class read as another
        raise RecipeError(f"hf.labels {hf_cfg.labels} names the teacher's classes in another order than its classifier "
                          f"outputs them ({own}: output i is class i of that list); give them in that order, or remove "
                          "hf.labels to take the teacher's")
    return list(hf_cfg.labels)


def check_recipe(recipe, progressive: bool = False) -> None:
    """What an hf recipe's target can be: a size (ratio, size_kb), met by the heads and FFN neurons
    kept (hf/size_target.py), in one joint or sequential run of the student."""
    target = recipe.target
    if target is None:
        return
    if target.is_latency:
        raise RecipeError("target: a latency target chooses the channels of the core image models; for an hf recipe "
                          "give a size target (ratio or size_kb), or remove target and set prune_heads / prune_ffn "
                          "sparsity (`benchmarks/hf_latency.py` times the result)")
    if progressive:
        raise RecipeError("target with progressive compression (run_hf_recipe(..., progressive=True), "
                          "benchmarks/hf_sst2_core.py --mode progressive): the heads and neurons are removed from the "
                          "teacher there, before the student exists; run the size target jointly or sequentially")
    if any(t.type == "prune_layers" for t in recipe.techniques):
        raise RecipeError("target with prune_layers: the size target chooses heads and FFN neurons of the student's "
                          "layers; choose the layers with hf.student_layers instead, or remove target")


def load_models(run: HFRun, weights, trim_vocab: bool | None = None) -> None:
    """The fine-tuned teacher, its tokenizer, and the student (a subset of its layers, or a copy). `trim_vocab`:
    run_hf_recipe's override of hf.trim_vocab (None: the recipe's), whose tokenizer is checked here."""
    run.src = src = teacher_source(run.recipe, weights)
    refuse_causal_lm(src)
    config = folder_config(src)
    if config is not None:  # before anything is loaded: a family this path refuses failed in the load with another error
        check_family(config, src)
    if src == MINILM_NAME or teacher_labels(src) is None:  # a base encoder's folder too (architectures: BertModel)
        what = "the bundled MiniLM base" if src == MINILM_NAME else f"{src}, a base encoder without a classifier,"
        run.warnings.append(
            f"teacher is {what} with an untrained classification head: distillation then copies a random classifier. "
            "Fine-tune it first (benchmarks/hf_sst2.py teacher) and pass --weights runs/hf_teacher"
        )
        run.log(run.warnings[-1])
    torch.manual_seed(run.recipe.training.seed)
    run.labels = class_names(run.hf_cfg, src)
    labels = dict(enumerate(run.labels))
    run.tok = load_tokenizer(src)
    if run.hf_cfg.trim_vocab if trim_vocab is None else trim_vocab:  # here, not after training (a run lost)
        from jointcompress.hf.vocab import check_trimmable

        check_trimmable(run.tok)
    run.teacher = load_classifier(src, num_labels=len(labels), id2label=labels).eval()
    check_family(run.teacher.config, src)
    check_tokenizer(run.tok, run.teacher.config, src)
    check_max_length(run.hf_cfg.max_length, run.teacher.config, src)
    layers_ = run.hf_cfg.student_layers
    if layers_:
        n = n_layers(run.teacher.config)
        if [i for i in layers_ if i >= n]:
            raise RecipeError(f"hf.student_layers {layers_}: the teacher has {n} layers (indices 0..{n - 1})")
        run.student = make_student(run.teacher, layers_)
    else:
        run.student = copy.deepcopy(run.teacher)


def usable_positions(config) -> int | None:
    """How many tokens the model's position embeddings cover: max_position_embeddings, less RoBERTa's
    padding_idx + 1 (its positions start after the padding index); None where it has no such table."""
    positions = getattr(config, "max_position_embeddings", None)
    relative = (getattr(config, "position_embedding_type", "absolute") != "absolute"
                or not getattr(config, "position_biased_input", True))  # DeBERTa without absolute positions
    if not isinstance(positions, int) or relative:
        return None
    if "roberta" in str(getattr(config, "model_type", "")) and isinstance(getattr(config, "pad_token_id", None), int):
        positions -= config.pad_token_id + 1
    return positions


def check_tokenizer(tok, config, src: str) -> None:
    """A teacher folder without tokenizer files gave transformers' empty tokenizer (its special tokens only):
    every word became [UNK], the whole run trained on them, and that tokenizer shipped with the artifact."""
    if len(tok) <= len(set(tok.all_special_ids)):
        raise DataError(f"teacher {src}: its tokenizer holds {len(tok)} tokens, its special ones only, where the model's "
                        f"embedding table has {getattr(config, 'vocab_size', '?')} rows: the folder holds no tokenizer "
                        "of the model's (every word would read as one unknown token). Save the tokenizer it was trained "
                        "with there: tokenizer.save_pretrained(folder)")


def check_max_length(max_length: int, config, src: str) -> None:
    """Rows are padded to hf.max_length: a length past the position table trained the whole run on
    short rows and then failed in the int8 export (or, with long rows, failed before training), with
    torch's size mismatch naming neither."""
    positions = usable_positions(config)
    if positions is not None and max_length > positions:
        raise RecipeError(f"hf.max_length {max_length}: the teacher {src} has position embeddings for {positions} "
                          f"tokens (max_position_embeddings {config.max_position_embeddings}); set hf.max_length to "
                          f"at most {positions}")


def refuse_causal_lm(src: str) -> None:
    """A causal LM's folder (its config's architectures: *ForCausalLM, *LMHeadModel) is refused before it is loaded:
    it was loaded as a sequence classifier with a new, random head (transformers' report of the missing
    score.weight), then refused as a "classifier" of an unsupported type."""
    config = folder_config(src)
    if config is None:
        return  # loading the model says why
    causal = [a for a in (config.architectures or []) if str(a).endswith(("ForCausalLM", "LMHeadModel"))]
    if causal:
        raise UnsupportedModelError(
            f"teacher {src}: a causal language model ({causal[0]}); `jointcompress compress` with an hf: section "
            "compresses sequence classifiers. Compress a causal LM from Python: jointcompress.prepare(model, recipe, "
            "...) with its own next-token loss (dict batches with labels), prune_ffn / prune_unstructured / quant_lsq / "
            "distill_kd (docs/your-model.md, benchmarks/causal_lm_session.py)")


def check_family(config, src: str) -> None:
    """This path removes heads, FFN neurons and layers and exports the pruned model with per-layer
    widths, which it can do for the families with a pruned class (modeling_pruned.PRUNED_CLASSES)
    only: another model type is refused here, naming the way it can be compressed, not by a
    ValueError deep in pruning or an export refused after the run."""
    from jointcompress.hf.modeling_pruned import CAUSAL, FAMILY_OF, PRUNED_CLASSES

    if getattr(config, "problem_type", None) == "multi_label_classification":  # trained as a softmax, said nowhere
        raise UnsupportedModelError(
            f"teacher {src}: problem_type multi_label_classification; `jointcompress compress` with an hf: section "
            "trains one label a row (cross-entropy, softmax distillation), and the exported model's sigmoid would read "
            "logits trained under a softmax. Compress a multi-label classifier from Python: jointcompress.prepare with "
            "loss_fn=binary cross-entropy on its logits, and distill_kd.features (loss: mse on the logits' layer) with "
            "alpha: 0 in place of the softmax distillation")
    classifiers = sorted(set(PRUNED_CLASSES) - set(CAUSAL))
    if FAMILY_OF.get(getattr(config, "model_type", None)) not in classifiers:
        architectures = [str(a) for a in (getattr(config, "architectures", None) or [])]
        kind = ("Classifiers" if not architectures or any(a.endswith("ForSequenceClassification") for a in architectures)
                else f"Models ({', '.join(architectures)})")
        raise UnsupportedModelError(
            f"teacher {src}: model_type {config.model_type!r}; `jointcompress compress` with an hf: section prunes and exports "
            f"the classifiers of model_type {', '.join(classifiers)} only. {kind} of model_type "
            f"{config.model_type!r} compress from Python, where the session takes the model and its dict batches as "
            "they are (quant_lsq, prune_unstructured, distill_kd; docs/your-model.md)")


def _tokens(run: HFRun, data: TextDataset) -> dict:
    """The rows tokenized at hf.max_length, with token types only for a teacher that has more than one."""
    config = run.teacher.config if run.teacher is not None else None
    tokens = tokenize(run.tok, data, run.hf_cfg.max_length, token_types=getattr(config, "type_vocab_size", 2) >= 2)
    check_ids_fit(tokens["input_ids"], config, data)
    return tokens


def check_ids_fit(ids, config, data: TextDataset) -> None:
    """Every token id indexes the teacher's embedding table: a tokenizer larger than the model's vocabulary (another
    model's, saved beside it) failed inside the first forward with torch's "index out of range in self", after a
    long traceback through the training loop."""
    rows = getattr(config, "vocab_size", None)
    if not isinstance(rows, int) or not ids.numel() or int(ids.max()) < rows:
        return
    row = int((ids >= rows).any(1).nonzero()[0])
    raise DataError(f"the tokenizer gives token id {int(ids.max()):,} (the row {data.sentences[row][:60]!r} holds "
                    f"one of {rows:,} or more), but the teacher's embedding table has {rows:,} rows (config vocab_size): the "
                    "folder holds another model's tokenizer. Save the tokenizer the model was trained with beside it: "
                    "tokenizer.save_pretrained(folder)")


def load_text(run: HFRun, data_dir) -> None:
    """The train and dev files read, limited, checked against the classes, tokenized."""
    hf_cfg, n_labels = run.hf_cfg, len(run.labels)
    train_file, dev_file = split_files(data_dir or run.recipe.data)
    read = dict(text_column=hf_cfg.text_column, pair_column=hf_cfg.pair_column, label_column=hf_cfg.label_column,
                label_names=run.labels, columns=hf_cfg.columns)
    run.train_data = read_rows(train_file, **read).subset(hf_cfg.train_limit, seed=run.recipe.training.seed)
    run.dev_data = dev = read_rows(dev_file, **read).head(hf_cfg.eval_limit)
    if (run.train_data.pairs is None) != (dev.pairs is None):
        raise DataError(f"{train_file.name} and {dev_file.name}: one holds sentence pairs, the other single texts; "
                        "give both files the same columns")
    for f, d in ((train_file, run.train_data), (dev_file, dev)):
        bad = sorted({y for y in d.labels if not 0 <= y < n_labels})
        if bad:
            raise DataError(f"{f.name} has labels {bad[:5]}; the classifier has {n_labels} classes {run.labels} "
                            f"(0..{n_labels - 1}), so the data's labels must be among them (a teacher fine-tuned on "
                            "another task has another head; a base encoder gets one of hf.labels' size)")
    run.dev_t = _tokens(run, dev)
    run.x_dev, run.y_dev = pack_tokens(run.dev_t), run.dev_t["labels"]
    hold_out_rows(run, train_file.name)
    warn_absent_classes(run, train_file.name)


def warn_absent_classes(run: HFRun, train_name: str) -> None:
    """A teacher with more classes than the rows it trains on (a 3-way NLI head on 2-way rows) trained without a
    word: the student keeps every output, is distilled towards the teacher's belief in classes no row labels, and
    never learns them from a label. Read on the rows that train (after hf.train_limit and the held-out rows). Said,
    not refused: a subset may leave a class out on purpose."""
    used = set(run.train_data.labels)
    absent = [name for i, name in enumerate(run.labels) if i not in used]
    if absent and used:
        limit = run.hf_cfg.train_limit
        rows = f"the {len(run.train_data)} training rows" + (f" drawn from {train_name} (hf.train_limit: {limit})" if limit
                                                            else f" of {train_name}")
        run.warnings.append(f"{rows} label {len(used)} of the classifier's {len(run.labels)} classes {run.labels}; none is "
                            f"{absent}: the student keeps those outputs, learns them from the teacher only, and is "
                            "distilled towards its belief in them. Give rows of every class (a larger hf.train_limit), or "
                            "a teacher fine-tuned on this task's classes (hf.labels for a base encoder)")
        run.log(run.warnings[-1])


def hold_out_rows(run: HFRun, train_name: str) -> None:
    """training.validation_images rows of the training file held out (a fixed draw) for the run's choices
    (the kept epoch), so the dev file is only reported on."""
    held = run.recipe.training.validation_images
    if not held:
        return
    if held >= len(run.train_data):
        raise DataError(f"training.validation_images: {held} of the {len(run.train_data)} training rows of {train_name} "
                        f"(after hf.train_limit) would leave none to train on; hold out fewer (e.g. "
                        f"{len(run.train_data) // 10}), or 0 to choose on the dev file")
    run.train_data, chosen_on = run.train_data.hold_out(held)
    sel = _tokens(run, chosen_on)
    run.x_sel, run.y_sel = pack_tokens(sel), sel["labels"]
    run.selected_on = f"validation ({held} training row{'s' if held != 1 else ''} held out)"


def _warn_under_chance(run: HFRun) -> None:
    """A teacher far under chance on the dev rows reads other text or other labels than it was trained on (the
    label column as the text, class names in another order): the run went on and distilled it, without a word."""
    if run.src == MINILM_NAME or teacher_labels(run.src) is None:  # a new, untrained head: any reading is chance's
        return
    chance = 1.0 / max(2, len(run.labels))
    if run.teacher_acc is not None and run.teacher_acc < chance / 2:
        run.warnings.append(
            f"the teacher reads the dev rows at {run.teacher_acc:.1%}, under half of chance ({chance:.0%} for "
            f"{len(run.labels)} classes): the text column (hf.text_column), the label column or the classes' order "
            "(hf.labels) is likely not what it was trained on, and the student learns from that")
        run.log(run.warnings[-1])


def train(run: HFRun, dist, progress, callbacks, progressive: bool, compress_kwargs: dict, device=None) -> None:
    """Compress the student (joint/sequential: one compress() run; progressive: two stages), on
    `device` (default: the CPU): the teacher and the student go there, CPU batches follow them."""
    from jointcompress.api import compress, validation_held_out

    recipe = run.recipe
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    train_t = _tokens(run, run.train_data)
    loader = tensor_loader(train_t, recipe.training.batch_size, shuffle=True, seed=recipe.training.seed, rank=rank, world=world)
    if device is not None:
        run.teacher.to(device)
        run.student.to(device)
    teacher_w = SequenceClassifier(run.teacher).eval()
    run.teacher_acc = accuracy(teacher_w, run.x_dev, run.y_dev)
    run.log(f"teacher dev accuracy {run.teacher_acc:.4f} on {len(run.y_dev)} rows; training on {len(run.train_data)} rows; "
            f"kept epoch chosen on {run.selected_on}")
    _warn_under_chance(run)
    # the kept epoch is chosen on the held-out training rows where the recipe holds some out, else on dev
    x_sel, y_sel = (run.x_sel, run.y_sel) if run.x_sel is not None else (run.x_dev, run.y_dev)
    evaluate = lambda m: {"accuracy": accuracy(m, x_sel, y_sel)}  # noqa: E731
    if not progressive:
        with validation_held_out():  # hold_out_rows held them out, and `evaluate` reads them
            run.result = compress(SequenceClassifier(run.student), recipe, loader, evaluate, teacher=teacher_w,
                                  progress=progress, callbacks=callbacks, run_dir=run.out,
                                  distributed=dist if dist is not None else False, **compress_kwargs)
        return
    from jointcompress.progressive import progressive as _progressive

    if dist is not None:
        raise RecipeError("progressive HF compression runs in one process; start it without torchrun")
    layers_ = run.hf_cfg.student_layers
    check_student_layers_after_pruning(layers_, recipe, run.teacher.config)
    with validation_held_out():
        run.stage1, run.result = _progressive(
            teacher_w, None, recipe, loader, evaluate, progress=progress,
            student_from=lambda t: SequenceClassifier(make_student(t.hf, layers_) if layers_ else copy.deepcopy(t.hf)))


def check_student_layers_after_pruning(layers: list[int] | None, recipe, config) -> None:
    """In progressive compression the student is made of the *pruned* teacher's layers: with prune_layers in stage 1,
    hf.student_layers index what it leaves. An index past that failed only after stage 1 had trained, naming an
    internal keep_layers; refused here, before any training."""
    prune = recipe.technique("prune_layers")
    if not layers or prune is None:
        return
    from jointcompress.hf.pruned import n_layers
    from jointcompress.techniques.prune_units import kept_units

    total = n_layers(config)
    left = kept_units(1, total, prune)[1]
    if max(layers) >= left:
        raise RecipeError(f"hf.student_layers {layers}: in progressive compression they are layers of the teacher "
                          f"after stage 1, and prune_layers (sparsity {prune.sparsity}) leaves {left} of its {total} layers; "
                          f"give indices in 0..{left - 1}, or lower prune_layers.sparsity")


def finalize_student(run: HFRun, trim_vocab: bool | None) -> None:
    """Masks and LSQ made permanent, heads / neurons removed; optionally the vocabulary trimmed."""
    from jointcompress.hf.finalize import finalize_hf_with_spec
    from jointcompress.model_copy import on_cpu

    run.hf, run.spec = finalize_hf_with_spec(run.result.model, run.result.techniques)
    # trained on a GPU: written, exported and measured from the CPU (the teacher's latency is timed there too)
    run.hf, run.spec = on_cpu(run.hf, run.spec)
    run.teacher.cpu()
    run.hf.eval()
    acc = accuracy(SequenceClassifier(run.hf), run.x_dev, run.y_dev)
    run.measured.update(final_acc=acc, vocab_note={})
    if not (run.hf_cfg.trim_vocab if trim_vocab is None else trim_vocab):
        return
    from jointcompress.hf.vocab import trim_vocab as _trim

    full_vocab = run.hf.config.vocab_size
    run.hf, run.tok, keep = _trim(run.hf, run.tok, run.train_data.texts)
    run.hf.eval()
    run.dev_t = _tokens(run, run.dev_data)
    run.x_dev = pack_tokens(run.dev_t)
    run.measured["vocab_note"] = {"dev_accuracy_full_vocab": acc, "vocab_kept": len(keep), "vocab_full": full_vocab}
    run.measured["final_acc"] = accuracy(SequenceClassifier(run.hf), run.x_dev, run.y_dev)
    run.log(f"vocabulary trimmed to {len(keep)} of {full_vocab} word pieces; dev accuracy {acc:.4f} -> "
            f"{run.measured['final_acc']:.4f}")
    _say_trim_cost(run, acc, len(keep), full_vocab)


TRIM_COST_SAID = 0.01  # dev accuracy trim_vocab may cost before the run says so among its notes


def _say_trim_cost(run: HFRun, before: float, kept: int, full: int) -> None:
    """The trim keeps the word pieces the training rows use: from a few hundred rows (hf.train_limit) many dev
    words fall to [UNK], and the accuracy that cost was a log line only."""
    drop = before - run.measured["final_acc"]
    if drop <= TRIM_COST_SAID:
        return
    limited = " (hf.train_limit)" if run.hf_cfg.train_limit is not None else ""
    run.warnings.append(f"trim_vocab cost {100 * drop:.1f} points of dev accuracy ({before:.4f} -> "
                        f"{run.measured['final_acc']:.4f}): the vocabulary kept the {kept} of {full} word pieces that "
                        f"the {len(run.train_data.texts):,} training rows{limited} use, and dev words outside them now "
                        "read as [UNK]. Trim from more training rows, or set hf.trim_vocab: false")
    run.log(run.warnings[-1])


def save_artifact(run: HFRun) -> None:
    """The packed artifact, written and loaded back: everything after this is the saved model."""
    from jointcompress.hf.artifact import artifact_bytes, load_hf_artifact, save_hf_artifact

    art_dir = Path(run.out) / "artifact"
    run.spec.recipe = run.recipe.model_dump(mode="json")
    save_hf_artifact(run.hf, run.spec, art_dir, run.tok, ptq_bits=run.hf_cfg.ptq_bits)
    run.hf, _ = load_hf_artifact(art_dir)
    run.measured.update(art_dir=art_dir, art_acc=accuracy(SequenceClassifier(run.hf), run.x_dev, run.y_dev),
                        art_bytes=artifact_bytes(art_dir))
    run.log(f"artifact {art_dir}: {run.measured['art_bytes']['model']:,} bytes (weights + manifest), "
            f"dev accuracy {run.measured['art_acc']:.4f}")


def artifact_summary(run: HFRun, teacher_bytes: int | None) -> dict:
    m, spec, acc = run.measured, run.spec, run.measured["art_acc"]
    return {
        "path": str(m["art_dir"]), "dev_accuracy": acc, "bytes": m["art_bytes"],
        "accuracy_ratio_vs_teacher": acc / run.teacher_acc if run.teacher_acc else None,
        "size_ratio_vs_teacher": teacher_bytes / m["art_bytes"]["model"] if teacher_bytes else None,
        "lsq_layers": {str(b): sum(1 for ls in spec.layers.values() if ls.bits == b)
                       for b in sorted({ls.bits for ls in spec.layers.values()})},
        "ptq_bits": run.hf_cfg.ptq_bits,
        "target": _target_summary(m),
    }


def _target_summary(measured: dict) -> dict | None:
    """The size target's plan beside the weights file it gave (None without a target)."""
    plan = measured.get("target")
    if plan is None:
        return None
    reached = measured["art_bytes"]["weights"]
    return {**plan, "weights_bytes": reached, "met": reached <= plan["goal_bytes"],
            "ratio_reached": plan["teacher_fp32_bytes"] / reached}


def model_summary(run: HFRun, folder: Path, student_bytes: int | None, teacher_bytes: int | None) -> tuple[dict, dict]:
    t, hf, m = run.teacher, run.hf, run.measured
    teacher = {"source": run.src, "dev_accuracy": run.teacher_acc, "folder_bytes": teacher_bytes,
               "layers": len(head_counts(t)), "heads": sum(head_counts(t)), "ffn_neurons": sum(ffn_widths(t))}
    student = {"dev_accuracy": m["final_acc"], "dev_accuracy_masked": run.result.metrics.get("accuracy"),
               "folder_bytes": student_bytes, "layers": len(head_counts(hf)), "heads_per_layer": head_counts(hf),
               "intermediate_per_layer": ffn_widths(hf),
               "model_type": json.loads((folder / "config.json").read_text())["model_type"],
               "vocab_size": hf.config.vocab_size, **m["vocab_note"]}
    return teacher, student

"""A real transformers.Trainer.train() compressing a tiny random BERT through the session:
pruning reaches its target, LSQ step sizes train, distillation runs, the teacher is untouched
and finalize keeps the masked model's logits."""
from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from hf_helpers import tiny_bert  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

import jointcompress  # noqa: E402
from jointcompress.errors import RecipeError  # noqa: E402
from jointcompress.integrations.hf_trainer import CompressionTrainer  # noqa: E402

RECIPE = {
    "techniques": [
        {"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5, "targets": ["*encoder.layer.*"]},
        {"type": "quant_lsq", "bits": 4, "targets": ["*encoder.layer.*"]},
        {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5},
    ],
    "coordination": {"strategy": "scale", "every": 2},
}


def _rows(n=48, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, length // 2:] = 0
    labels = (ids[:, 1] > 30).long()
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def test_trainer_train_compresses_through_the_session(tmp_path):
    teacher = tiny_bert(layers=2, seed=1)
    teacher_state = copy.deepcopy(teacher.state_dict())
    model = tiny_bert(layers=2, seed=0)
    steps, accum = 8, 2
    session = jointcompress.prepare(model, RECIPE, total_steps=steps, teacher=teacher)
    quant = next(t for t in session.techniques if t.kind == "quant_lsq")
    first_steps = {n: q.log_step.detach().clone() for n, q in quant.quantizers.items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=6,
                             gradient_accumulation_steps=accum, learning_rate=1e-3, report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    terms_seen = []
    orig = session.loss

    def spy(outputs, batch=None, task_loss=None):
        out = orig(outputs, batch, task_loss)
        terms_seen.append(sorted(out))
        return out

    session.loss = spy
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows())
    trainer.train()
    assert trainer.state.global_step == steps and session.step == steps
    assert len(terms_seen) == steps * accum and terms_seen[-1] == ["distill", "task"]
    prune = next(t for t in session.techniques if t.kind == "prune_unstructured")
    assert prune.at_target() and abs(prune.achieved_sparsity() - 0.5) < 0.01
    assert any(not torch.equal(first_steps[n], q.log_step) for n, q in quant.quantizers.items())  # LSQ trained
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in opt_params for g in quant.parameters() for p in g["params"])
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())

    model.eval()
    batch = {k: torch.stack([r[k] for r in _rows(6, seed=3)]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        masked = model(**batch).logits
    session.finalize()
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    with torch.no_grad():
        final = model(**batch).logits
    assert torch.allclose(masked, final, atol=1e-4), (masked - final).abs().max()
    w = model.bert.encoder.layer[0].attention.self.query.weight
    assert max(len(row.unique()) for row in w) <= 16


def test_save_model_before_finalize_is_said_and_keeps_the_sessions_state(tmp_path):
    """trainer.save_model() before session.finalize() wrote the weights under their parametrizations, which
    from_pretrained reported missing and initialized at random: a model that loaded untrained, with no word.
    It is said, with the session's state beside the weights; after finalize the folder loads the same logits."""
    import warnings

    from transformers import AutoModelForSequenceClassification

    from jointcompress.integrations.hf_trainer import SESSION_FILE

    model, steps = tiny_bert(layers=2, seed=0), 2
    session = jointcompress.prepare(model, RECIPE, total_steps=steps, teacher=tiny_bert(layers=2, seed=1))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=8,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows(16))
    trainer.train()
    with pytest.warns(UserWarning, match=r"save_model before session.finalize\(\): .* from_pretrained does not read"):
        trainer.save_model(str(tmp_path / "early"))
    assert (tmp_path / "early" / SESSION_FILE).is_file()
    session.finalize()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / SESSION_FILE).exists()
    batch = {k: torch.stack([r[k] for r in _rows(6, seed=3)]) for k in ("input_ids", "attention_mask")}
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits, atol=1e-5)


def test_save_model_after_finalize_says_the_folder_drops_the_input_rounding(tmp_path):
    """With quant_lsq activations: true, the finalized model rounds each layer's input; its transformers folder
    cannot, and loaded with logits 0.019 off (of 0.76), where export_folder says so and save_model did not."""
    from transformers import AutoModelForSequenceClassification

    model = tiny_bert(layers=2, seed=0)
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 8, "activations": True, "targets": ["*encoder.layer.*"]}]}
    session = jointcompress.prepare(model, recipe, total_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows(16))
    trainer.train()
    session.finalize()
    with pytest.warns(UserWarning, match=r"does not round the inputs of \d+ layers as training did"):
        trainer.save_model(str(tmp_path / "final"))
    batch = {k: torch.stack([r[k] for r in _rows(6, seed=3)]) for k in ("input_ids", "attention_mask")}
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    model.eval()
    with torch.no_grad():  # what the warning is about
        assert not torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_trainer_train_compresses_a_causal_lm_with_token_level_kd(tmp_path):
    from test_causal_lm import RECIPE as LM_RECIPE
    from test_causal_lm import llama, rows

    teacher = llama().eval()
    model = copy.deepcopy(teacher)
    ids, mask = rows(32, 0)
    ds = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i].masked_fill(mask[i] == 0, -100)}
          for i in range(32)]
    session = jointcompress.prepare(model, LM_RECIPE, total_steps=6, teacher=teacher)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=3e-3,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    CompressionTrainer(session=session, model=model, args=args, train_dataset=ds).train()
    assert session.step == 6 and abs(session.metrics()["prune_unstructured.sparsity"] - 0.5) < 0.01
    x, xm = rows(4, 1)
    model.eval()
    with torch.no_grad():
        masked = model(input_ids=x, attention_mask=xm).logits
    session.finalize()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x, attention_mask=xm).logits, masked, atol=1e-4)
    prompt = x[:1, :5]
    assert model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_trainer_trains_the_joint_form_and_lands_the_file_on_the_size_target(tmp_path):
    """`mode: joint` with a ratio target through a real Trainer: prepare() trains the recipe's joint
    form (zero as a quantizer level under the size budget, in the session), and the saved weights
    file lands on the target; at 4x the 4-bit encoder alone is over it (the embeddings stay fp32), so
    the dead zones must prune."""
    from jointcompress.artifact import save
    from jointcompress.artifact.size import dense_fp32_bytes

    teacher, model = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=0)
    goal = dense_fp32_bytes(model) / 4
    recipe = {"mode": "joint", "target": {"ratio": 4},
              "techniques": [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4},
                             {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]}
    steps = 40
    session = jointcompress.prepare(model, recipe, total_steps=steps, teacher=teacher)
    assert session.recipe.technique("size_budget").target_bytes == pytest.approx(goal)
    assert session.recipe.technique("prune_unstructured") is None
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=6, learning_rate=1e-3,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows()).train()
    assert session.step == steps
    batch = {k: torch.stack([r[k] for r in _rows(6, seed=3)]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        masked = model(**batch).logits
    spec = session.finalize(batch)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, masked, atol=1e-4)
    pruned = model.bert.encoder.layer[0].intermediate.dense.weight
    assert float((pruned == 0).float().mean()) > 0.2  # the dead zones pruned to reach the target
    manifest = save(model, spec, tmp_path / "a", builder=lambda: tiny_bert(layers=2), example_inputs=batch)
    on_disk = (tmp_path / "a" / "weights.jcw").stat().st_size
    assert on_disk == manifest["weights_file_bytes"]
    assert goal * 0.9 <= on_disk <= goal * 1.02, (on_disk, goal)


def _joint_trainer(tmp_path, steps: int, **args) -> tuple[CompressionTrainer, object]:
    """The joint form under a 4x size target with PCGrad on every step, two micro-batches a step."""
    teacher, model = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=0)
    recipe = {"mode": "joint", "target": {"ratio": 4}, "coordination": {"strategy": "pcgrad", "every": 1},
              "techniques": [{"type": "quant_lsq", "bits": 4}, {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]}
    session = jointcompress.prepare(model, recipe, total_steps=steps, teacher=teacher)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=6,
                             gradient_accumulation_steps=2, max_grad_norm=1.0, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0, **args)
    return CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows()), session


def test_accumulated_micro_batches_are_coordinated_together_before_the_trainer_clips(tmp_path, monkeypatch):
    """gradient_accumulation_steps 2 with PCGrad: each micro-batch was projected on its own. The step's
    micro-batches are now resolved together on the last one, in training_step, before the Trainer clips
    the gradients (its on_pre_optimizer_step, where before_step runs, comes after the clipping)."""
    from jointcompress.coordination import GradientCoordinator

    events = []
    settle = GradientCoordinator.settle
    monkeypatch.setattr(GradientCoordinator, "settle", lambda self, *args: events.append(("settle", settle(self, *args)))
                        or events[-1][1])
    trainer, session = _joint_trainer(tmp_path, steps=3, learning_rate=1e-3)
    clip = trainer._clip_grad_norm
    monkeypatch.setattr(trainer, "_clip_grad_norm", lambda m: events.append(("clip", None)) or clip(m))
    trainer.train()
    assert session.step == 3
    # per step: the last micro-batch settles two micro-batches (True), the Trainer clips, before_step finds
    # nothing left; the third step is past the size budget's freeze (80% of the run): accuracy alone
    assert events == [("settle", True), ("clip", None), ("settle", False)] * 2 + [
        ("settle", False), ("clip", None), ("settle", False)], events


def _bare_name(name: str) -> str:
    return name.replace("parametrizations.", "").replace(".original", "")


def test_fp16_loss_scaling_trains_what_fp32_trains(tmp_path):
    """fp16=True gives the Trainer a GradScaler. Its training_step is replaced by the session's, which never
    scaled a loss, so the first optimizer step stopped ("Attempted step but _scale is None"); had it gone on,
    the Trainer's unscaling would have divided unscaled gradients by 4,096 here (65,536 by default). The
    session's backward now scales the terms by the scaler and before_step works on unscaled gradients
    (session/loss_scale.py)."""
    trained = {}
    for fp16 in (False, True):
        trainer, session = _joint_trainer(tmp_path / str(fp16), steps=4, learning_rate=0.2, optim="sgd", fp16=fp16)
        if fp16:  # what accelerate sets up on a GPU (on a CPU it makes no scaler)
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
            trainer.accelerator.native_amp = True
        trainer.train()
        assert session.step == 4
        trained[fp16] = {n: p.detach() for n, p in trainer.model.named_parameters()}
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 12  # it scaled every step, and none overflowed
    start = {n: p.detach() for n, p in tiny_bert(layers=2, seed=0).named_parameters()}
    fp32, fp16 = trained[False], trained[True]
    assert fp32.keys() == fp16.keys()
    moved = sum(int((p - start[_bare_name(n)]).abs().gt(1e-3).sum()) for n, p in fp32.items() if _bare_name(n) in start)
    apart = sum(int((fp16[n] - p).abs().gt(1e-3).sum()) for n, p in fp32.items())
    total = sum(p.numel() for p in fp32.values())
    # fp16 autocast rounds the forward: a weight at a level's (or the landing's) edge may go the other way
    assert moved > 0.05 * total and apart < 0.002 * total, (moved, apart, total)


def test_bf16_trains_through_the_session_in_bfloat16_autocast(tmp_path):
    """bf16=True needs no scaler: the Trainer's autocast reaches the session's forward; the weights stay float32."""
    trainer, session = _joint_trainer(tmp_path, steps=3, learning_rate=1e-3, bf16=True)
    seen = set()
    trainer.model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda m, i, out: seen.add(out.dtype) if m.training else None)
    trainer.train()
    assert session.step == 3 and seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.model.parameters())


def _spied_run(tmp_path, **args) -> list[dict]:
    """A distilled tiny BERT under the Trainer with `args`; per micro-batch, the task loss the session was
    given, the outputs and labels it was computed from, and the terms the backward got."""
    teacher, model = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=0)
    with torch.no_grad():  # confident logits, where smoothing the labels changes the loss
        model.classifier.weight.mul_(50.0)
    session = jointcompress.prepare(model, {"techniques": [{"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]},
                                    total_steps=2, teacher=teacher)
    seen, loss, backward = [], session.loss, session.backward
    session.loss = lambda outputs, batch=None, task_loss=None: seen.append(
        {"task_loss": task_loss, "logits": outputs.logits.detach(), "labels": batch["labels"]}) or loss(outputs, batch, task_loss)
    session.backward = lambda terms, scaler=None: seen[-1].update(terms={k: v.detach() for k, v in terms.items()}) or backward(
        terms, scaler)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=6,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             seed=0, **args)
    CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows()).train()
    return seen


def test_label_smoothing_is_the_task_term(tmp_path):
    """label_smoothing_factor was ignored: the session read the model's own (unsmoothed) loss."""
    from transformers.trainer_pt_utils import LabelSmoother

    seen = _spied_run(tmp_path, label_smoothing_factor=0.2)
    assert len(seen) == 2
    for micro in seen:
        smoothed = LabelSmoother(epsilon=0.2)({"logits": micro["logits"]}, micro["labels"])
        plain = torch.nn.functional.cross_entropy(micro["logits"], micro["labels"])
        assert micro["task_loss"] is not None and torch.allclose(micro["task_loss"].detach(), smoothed, atol=1e-6)
        assert not torch.allclose(smoothed, plain, atol=1e-3)
        assert torch.allclose(micro["terms"]["task"], 0.5 * smoothed, atol=1e-6)  # weighted by 1 - alpha


def test_label_smoothing_of_a_pruned_causal_class_predicts_the_next_token(tmp_path):
    """The Trainer shifts its smoothed labels only for the causal classes it knows by name: GPT-2 after
    conv1d_to_linear (JCGPT2LMHeadModel) was trained to predict each token's own id, without a word."""
    from test_causal_lm import gpt2, rows
    from transformers.trainer_pt_utils import LabelSmoother

    model = gpt2()
    assert type(model).__name__ == "JCGPT2LMHeadModel"
    ids, mask = rows(8, 0)
    ds = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i].masked_fill(mask[i] == 0, -100)}
          for i in range(8)]
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 8, "exclude": ["lm_head"]}]},
                                    total_steps=1)
    seen, loss = [], session.loss
    session.loss = lambda outputs, batch=None, task_loss=None: seen.append(
        (outputs.logits.detach(), batch["labels"], task_loss.detach())) or loss(outputs, batch, task_loss)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, learning_rate=1e-9,
                             label_smoothing_factor=0.1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, seed=0)
    CompressionTrainer(session=session, model=model, args=args, train_dataset=ds).train()
    (logits, labels, task), = seen
    items = (labels != -100).sum()  # the Trainer's num_items_in_batch
    smoother = LabelSmoother(epsilon=0.1)
    shifted = smoother({"logits": logits}, labels, shift_labels=True, num_items_in_batch=items)
    unshifted = smoother({"logits": logits}, labels, num_items_in_batch=items)
    assert torch.allclose(task, shifted, atol=1e-6) and not torch.allclose(task, unshifted, atol=1e-2)
    assert "_get_name" not in vars(model) and type(model).__name__ == model._get_name()  # named as itself again


def test_compute_loss_func_is_the_task_term_normalized_over_the_accumulated_batch(tmp_path):
    """A compute_loss_func normalizes over the step's accumulated batch (num_items_in_batch), so, as in the
    Trainer, its term is not divided by the accumulation steps again; distillation's is."""
    def summed_over_items(outputs, labels, num_items_in_batch=None):  # twice the model's own loss
        return 2.0 * torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch

    teacher, model = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=0)
    for m in model.modules():  # the same logits in the Trainer's training mode as below
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    session = jointcompress.prepare(model, {"techniques": [{"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]},
                                    total_steps=1, teacher=teacher)
    got, backward = [], session.backward
    session.backward = lambda terms, scaler=None: got.append({k: v.detach() for k, v in terms.items()}) or backward(terms, scaler)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=6,
                             gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0)
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows(12),
                                 compute_loss_func=summed_over_items)
    rows = _rows(12)
    # the logits the two micro-batches saw (the weights have not moved yet)
    with torch.no_grad():
        logits = model(**{k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}).logits
    labels = torch.stack([r["labels"] for r in rows])
    trainer.train()
    assert len(got) == 2
    whole = torch.nn.functional.cross_entropy(logits, labels)  # the mean over the step's 12 rows
    assert torch.allclose(sum(m["task"] for m in got), 0.5 * 2.0 * whole, atol=1e-4)  # (1 - alpha) * the function
    with pytest.raises(RecipeError, match="task loss is given twice"):
        CompressionTrainer(session=jointcompress.prepare(tiny_bert(layers=2), {"techniques": []}, total_steps=1,
                                                         loss_fn=lambda outputs, batch: outputs.logits.sum()),
                           model=tiny_bert(layers=2), args=args, compute_loss_func=summed_over_items)


def test_a_technique_that_starts_later_joins_the_trainers_optimizer_and_follows_its_schedule(tmp_path):
    """quant_lsq with `start: 0.5` adds its group mid-run: the Trainer's LambdaLR stopped with "zip()
    argument 2 is shorter than argument 1"; the group now follows the warm-up / decay at its own rate,
    without weight decay."""
    model = tiny_bert(layers=2, seed=0)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5, "targets": ["*encoder.layer.*"]},
                             {"type": "quant_lsq", "bits": 4, "start": 0.5, "step_lr": 5e-4,
                              "targets": ["*encoder.layer.*"]}]}
    steps = 8
    session = jointcompress.prepare(model, recipe, total_steps=steps)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=6, learning_rate=1e-3,
                             weight_decay=0.1, warmup_steps=2, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, seed=0)
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows())
    groups_at = []
    session.on_restructure.append(lambda: groups_at.append(len(trainer.optimizer.param_groups)))
    trainer.train()
    assert session.step == steps and groups_at and groups_at[-1] == len(trainer.optimizer.param_groups)
    late = trainer.optimizer.param_groups[-1]
    assert late["name"] == "quant_steps" and late["weight_decay"] == 0.0
    first = trainer.optimizer.param_groups[0]
    assert late["initial_lr"] == pytest.approx(5e-4) and late["lr"] == pytest.approx(first["lr"] * 0.5)
    assert len(trainer.lr_scheduler.lr_lambdas) == len(trainer.lr_scheduler.base_lrs) == len(trainer.optimizer.param_groups)


def test_train_resumes_from_a_trainer_checkpoint_to_the_uninterrupted_model(tmp_path):
    """resume_from_checkpoint: the Trainer's load kept what fit and dropped every compressed weight (stored under
    its parametrizations); a load hook refused it; then the optimizer state, matched by position to parameters a
    resumed session had reordered, crashed fused Adam. Each checkpoint now holds the session's state too."""
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5, "targets": ["*encoder.layer.*"]},
                             {"type": "quant_lsq", "bits": 4, "start": 0.3, "targets": ["*encoder.layer.*"]},
                             {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]}
    teacher, steps = tiny_bert(layers=2, seed=1), 8

    def trainer(out):
        model = tiny_bert(layers=2, seed=0)
        session = jointcompress.prepare(model, recipe, total_steps=steps, teacher=teacher)
        args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=6, learning_rate=1e-3,
                                 report_to=[], use_cpu=True, save_strategy="steps", save_steps=4, disable_tqdm=True,
                                 seed=0)
        return model, session, CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows())

    whole, whole_session, t = trainer(tmp_path / "a")
    t.train()
    resumed, resumed_session, t = trainer(tmp_path / "a")
    t.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert resumed_session.step == whole_session.step == steps
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_tokenizers_batch_encoding_is_a_batch_and_the_padding_collator_trains(tmp_path):
    """What a tokenizer and DataCollatorWithPadding return (a BatchEncoding: a mapping, not a dict) was
    refused as 'a batch of type BatchEncoding', so the standard set-up for text of varying length failed
    at its first step. It is read as the dict of its tensors: the same terms, and the Trainer trains."""
    from hf_helpers import tiny_tokenizer
    from transformers import DataCollatorWithPadding

    tok = tiny_tokenizer(tmp_path)
    teacher, model = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=0)
    steps = 4
    session = jointcompress.prepare(model, RECIPE, total_steps=steps, teacher=teacher)
    encoded = tok(["good movie", "a bad and boring plot"], padding=True, return_tensors="pt")
    encoded["labels"] = torch.tensor([1, 0])
    assert not isinstance(encoded, dict)
    with torch.no_grad():
        as_encoding = session.loss(model(**encoded), encoded)
        as_dict = session.loss(model(**encoded), dict(encoded))
    assert sorted(as_encoding) == ["distill", "task"]
    assert all(torch.equal(as_encoding[k], as_dict[k]) for k in as_dict)

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, 60, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist(),
             "labels": i % 2} for i in range(24)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=6,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, seed=0)
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=rows,
                                 data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    assert trainer.state.global_step == steps and session.step == steps


def test_load_best_model_at_end_restores_the_best_checkpoints_session_too(tmp_path):
    """The Trainer reloaded the best checkpoint's weights alone: its masks, scores and schedule stayed at the last
    step's, and evaluate() read a model no evaluation had seen (0.0878 where the chosen checkpoint logged 0.0869)."""
    teacher, model = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=0)
    session = jointcompress.prepare(model, RECIPE, total_steps=6, teacher=teacher)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=6, learning_rate=1e-3,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, eval_strategy="steps", eval_steps=2,
                             save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                             metric_for_best_model="eval_loss", greater_is_better=True)  # the worst loss: not the last
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows(), eval_dataset=_rows(12, seed=5))
    trainer.train()
    logged = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    best_step = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert best_step < 6 and session.step == best_step
    assert trainer.evaluate()["eval_loss"] == pytest.approx(logged[best_step], rel=1e-6)


class _ConvBNClassifier(torch.nn.Module):
    """A non-transformers model the Trainer drives: a dict in, {"loss", "logits"} out."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4, momentum=0.0)  # training never moves its statistics
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, pixel_values, labels=None):
        logits = self.fc(torch.relu(self.bn(self.conv(pixel_values))).mean((2, 3)))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def _conv_bn_session():
    """The ConvBN classifier, 48 rows of images far from zero mean, and an 8-bit session of 2 steps."""
    torch.manual_seed(0)
    model = _ConvBNClassifier()
    x = torch.randn(48, 1, 5, 5) * 3 + 2
    rows = [{"pixel_values": x[i], "labels": torch.tensor(i % 2)} for i in range(48)]
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 8}]}, total_steps=2,
                                    example_inputs={"pixel_values": x[:2]})
    return model, x, rows, session


def test_trainer_evaluate_re_estimates_batchnorm_statistics(tmp_path):
    model, x, rows, session = _conv_bn_session()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=16, per_device_eval_batch_size=16,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=rows, eval_dataset=rows)
    assert torch.equal(model.bn.running_mean, torch.zeros(4))
    trainer.evaluate()
    with torch.no_grad():  # three batches of 16: the average of their means is the data's mean
        expected = model.conv(x).mean((0, 2, 3))
    torch.testing.assert_close(model.bn.running_mean, expected, rtol=1e-4, atol=1e-5)


def test_the_evaluation_loss_is_the_fit_not_the_size_budget(tmp_path):
    """eval_loss summed every session term, the size budget's among them (negative under its goal), so
    metric_for_best_model="eval_loss" chose by where the budget stood. It is task plus distillation."""
    teacher, model = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=0)
    recipe = {"mode": "joint", "target": {"ratio": 3},
              "techniques": [{"type": "quant_lsq", "bits": 4}, {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]}
    session = jointcompress.prepare(model, recipe, total_steps=4, teacher=teacher)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=6, learning_rate=1e-3,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no")
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows(), eval_dataset=_rows(12, seed=5))
    batch = {k: torch.stack([r[k] for r in _rows(12, seed=5)]) for k in ("input_ids", "attention_mask", "labels")}
    model.eval()
    with torch.no_grad():
        terms = session.loss(model(**batch), batch)  # before training: the budget pulls with all its weight
    assert abs(float(terms["size"])) > 1e-3 and set(terms) >= {"task", "distill"}
    assert trainer.evaluate()["eval_loss"] == pytest.approx(float(terms["task"] + terms["distill"]), rel=1e-4)


def test_a_trainer_run_that_never_evaluates_ends_with_re_estimated_statistics(tmp_path):
    """eval_strategy "no": the statistics were re-estimated only inside evaluate(), so finalize and save kept
    the running averages of weights that had moved on (here: never moved at all, momentum 0)."""
    model, x, rows, session = _conv_bn_session()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=16, learning_rate=1e-3,
                             report_to=[], use_cpu=True, save_strategy="no", eval_strategy="no", disable_tqdm=True, seed=0)
    CompressionTrainer(session=session, model=model, args=args, train_dataset=rows).train()
    with torch.no_grad():  # three batches of 16, read with the weights training ended with
        expected = model.conv(x).mean((0, 2, 3))
    torch.testing.assert_close(model.bn.running_mean, expected, rtol=1e-4, atol=1e-5)


class _NoisyImages(torch.utils.data.Dataset):
    """Each read adds noise drawn from torch's generator (an augmentation)."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i] + torch.randn(()), "labels": torch.tensor(i % 2)}


def test_the_best_checkpoint_loaded_at_the_end_keeps_the_statistics_it_was_scored_with(tmp_path):
    """The pass when training ends ran after load_best_model_at_end had loaded the best checkpoint back, from a
    later random state: with an augmentation, the model kept was not the one its best_metric scored."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = _ConvBNClassifier()
    model.bn.momentum = 0.1
    x = torch.randn(64, 1, 5, 5) * 3 + 2
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 8}]}, total_steps=8,
                                    example_inputs={"pixel_values": x[:2]})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=16, learning_rate=0.05,
                             report_to=[], use_cpu=True, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                             save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                             disable_tqdm=True, seed=0)
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=_NoisyImages(x),
                                 eval_dataset=_NoisyImages(x[:16]))
    trainer.train()
    saved = load_file(str(tmp_path / trainer.state.best_model_checkpoint.rsplit("/", 1)[1] / "model.safetensors"))
    assert torch.equal(saved["bn.running_mean"], model.bn.running_mean)


def test_a_second_train_call_ending_at_the_same_step_re_estimates_again(tmp_path):
    """The pass when training ends was skipped where one had run at the same step number: a second train() on the
    trainer ends at that step again, with other weights, and kept the first call's statistics."""
    model, x, rows, session = _conv_bn_session()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=16, learning_rate=0.5,
                             report_to=[], use_cpu=True, save_strategy="no", eval_strategy="no", disable_tqdm=True, seed=0)
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=rows)
    for _ in range(2):
        trainer.train()
        with torch.no_grad():
            expected = model.conv(x).mean((0, 2, 3))
        torch.testing.assert_close(model.bn.running_mean, expected, rtol=1e-4, atol=1e-5)


def test_a_trainer_given_another_model_than_the_sessions_is_refused(tmp_path):
    """prepare(model_a) with CompressionTrainer(model=model_b) trained model_b dense, and finalize baked model_a."""
    session = jointcompress.prepare(tiny_bert(layers=2, seed=0), RECIPE, total_steps=4, teacher=tiny_bert(layers=2, seed=1))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(RecipeError, match=r"not the model the session was prepared on"):
        CompressionTrainer(session=session, model=tiny_bert(layers=2, seed=0), args=args, train_dataset=_rows())


def test_a_trainer_running_fewer_steps_than_the_session_planned_is_said_before_training(tmp_path):
    """total_steps counted in batches under gradient_accumulation_steps 2: the Trainer ran half the steps, and the
    model finalize baked was pruned to part of its target, said only by a warning at finalize."""
    model = tiny_bert(layers=2, seed=0)
    session = jointcompress.prepare(model, RECIPE, total_steps=8, teacher=tiny_bert(layers=2, seed=1))
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=6,
                             gradient_accumulation_steps=2, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows())
    import warnings

    said_by_step = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        said = lambda: [w for w in caught if "runs 4 optimizer steps" in str(w.message)]  # noqa: E731
        trainer.add_callback(type("Spy", (TrainerCallback,), {"on_step_begin": lambda *a, **k: said_by_step.append(
            len(said()))}))
        trainer.train()
    assert said_by_step[0] == 1 and session.step == 4, said_by_step  # said once, before the first step
    assert "total_steps=8, so the techniques will not reach their targets" in str(said()[0].message)


def test_load_best_model_at_end_chooses_among_the_compressed_checkpoints(tmp_path):
    """The Trainer's best checkpoint could be one saved before pruning reached its target (the lowest loss is the
    least pruned model's): finalize then baked a model pruned to a fraction of what was asked."""
    teacher, model = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=0)
    session = jointcompress.prepare(model, RECIPE, total_steps=8, teacher=teacher)  # pruning's ramp ends at step 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=6, learning_rate=1e-3,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, eval_strategy="steps", eval_steps=1,
                             save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                             metric_for_best_model="eval_loss", greater_is_better=True)  # scored as a metric that rises
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows(), eval_dataset=_rows(12, seed=5))
    trainer.train()
    logged = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    final = session.final_from()
    assert final == 4 and max(logged, key=logged.get) < final  # the Trainer's best was logged before the target
    best_step = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert best_step == max((s for s in logged if s >= final), key=logged.get) and session.step == best_step
    assert trainer.state.best_metric == logged[best_step]  # the score the Trainer says it loaded
    prune = next(t for t in session.techniques if t.kind == "prune_unstructured")
    assert abs(prune.achieved_sparsity() - 0.5) < 0.01


def test_load_best_model_at_end_with_no_compressed_checkpoint_keeps_the_last_model(tmp_path, monkeypatch):
    """The Trainer evaluates and saves the last step too, so a compressed checkpoint is there unless the schedule ends
    after every evaluation: then the last model is kept, said, not an uncompressed checkpoint loaded."""
    teacher, model = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=0)
    session = jointcompress.prepare(model, RECIPE, total_steps=6, teacher=teacher)
    monkeypatch.setattr(session, "final_from", lambda: 7)  # a ramp ending after the last evaluation
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=6, learning_rate=1e-3,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, eval_strategy="steps", eval_steps=3,
                             save_strategy="steps", save_steps=3, load_best_model_at_end=True,
                             metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows(), eval_dataset=_rows(12, seed=5))
    with pytest.warns(UserWarning, match=r"no checkpoint was evaluated at or after step 7.*the model of the last step is kept"):
        trainer.train()
    assert session.step == 6


def test_a_vision_model_with_channels_removed_is_refused_by_every_transformers_folder_save(tmp_path):
    """A ResNet's channels removed by prune_structured cannot be written into its config: save_model after finalize
    wrote a folder from_pretrained refused with a size mismatch (ignore_mismatched_sizes loaded those layers at
    random), and save_hf_artifact's error told the user to pass a builder it does not take. Each now refuses
    before writing and names jointcompress.artifact.save, which keeps the widths and loads back the same logits."""
    import warnings

    import transformers as t

    from jointcompress.artifact import load, save
    from jointcompress.errors import ArtifactError
    from jointcompress.hf.artifact import save_hf_artifact
    from jointcompress.hf.export import export_folder

    def build():
        torch.manual_seed(0)
        return t.ResNetForImageClassification(t.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16],
                                                             depths=[1, 1], layer_type="basic", num_labels=3))

    model = build()
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 3, (16,))
    session = jointcompress.prepare(model, {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.5}]},
                                    total_steps=2, example_inputs=x[:2])
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = CompressionTrainer(session=session, model=model, args=args,
                                 train_dataset=[{"pixel_values": x[i], "labels": y[i]} for i in range(16)])
    trainer.train()
    said = r"convolution.weight is \(4, 1, 7, 7\) but ResNetForImageClassification's config builds it as \(8, 1, 7, 7\)"
    with pytest.warns(UserWarning, match=rf"model.save_pretrained: .*{said}"):  # its own save_pretrained: said at once
        spec = session.finalize()
    assert model.resnet.embedder.embedder.convolution.weight.shape[0] == 4  # half the stem's 8 channels
    with pytest.raises(ArtifactError, match=rf"CompressionTrainer.save_model: .*{said}.*jointcompress.artifact.save"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()
    with pytest.raises(ArtifactError, match=rf"save_hf_artifact: .*{said}"):
        save_hf_artifact(model, spec, tmp_path / "packed", ptq_bits=None)
    with pytest.raises(ArtifactError, match=rf"export_folder: .*{said}"):
        export_folder(model, object(), tmp_path / "folder")
    save(model, spec, tmp_path / "kept", builder=build, example_inputs=x[:2])  # the save the errors name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load(tmp_path / "kept", build)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x[:4]).logits, model(x[:4]).logits, atol=1e-5)


class _InOrder(CompressionTrainer):
    """Batches in dataset order, so that one batch of 32 and two micro-batches of 16 hold the same rows."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _one_step_update(tmp_path, data, batch: int, steps: int, recipe: dict, **prepare_kwargs) -> torch.Tensor:
    """How one SGD step at LR 1, of `steps` micro-batches of `batch` rows, moves a tiny Llama's first down_proj."""
    from hf_helpers import tiny_llama

    base = tiny_llama()
    model = copy.deepcopy(base)
    session = jointcompress.prepare(model, recipe, total_steps=1, **prepare_kwargs)
    args = TrainingArguments(output_dir=str(tmp_path / f"r{batch}x{steps}"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=steps, max_steps=1, learning_rate=1.0, optim="sgd",
                             weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    _InOrder(session=session, model=model, args=args, train_dataset=data).train()
    layer = model.model.layers[0].mlp.down_proj
    weight = layer.parametrizations.weight.original if hasattr(layer, "parametrizations") else layer.weight
    return (weight - base.model.layers[0].mlp.down_proj.weight).detach()


def test_gradient_accumulation_over_padded_lm_rows_takes_the_update_of_one_batch(tmp_path):
    """The model's loss was a token mean per micro-batch, divided by the accumulation steps, and so was the token-level
    distillation: two micro-batches, one of short rows and one of long, updated 66% of the norm away from one batch
    of both, where the stock Trainer (num_items_in_batch) matches it."""
    from hf_helpers import tiny_llama
    from test_causal_lm import _padded_lm_rows

    for short, alpha in ((4, 0.5), (2, 1.0)):  # 2 real tokens a short row: its shifted labels half its positions,
        # where the distillation's share was of the labels (9% of the norm away with distillation alone)
        data, recipe = _padded_lm_rows(32, short), {"techniques": [{"type": "distill_kd", "alpha": alpha}]}
        whole, accumulated = (_one_step_update(tmp_path / f"s{short}", data, batch, steps, recipe,
                                               teacher=tiny_llama().eval()) for batch, steps in ((32, 1), (16, 2)))
        assert whole.norm() > 0 and (whole - accumulated).norm() / whole.norm() < 1e-5, short


def test_gradient_accumulation_with_a_loss_fn_of_the_users_divides_it_by_the_steps(tmp_path):
    """A task loss given to prepare(loss_fn=...) is the user's mean per micro-batch, not the model's loss over the
    step's tokens: it must still be divided by the accumulation steps (rows of equal length: one batch's update)."""
    import torch.nn.functional as F
    from test_causal_lm import _padded_lm_rows

    def next_token_loss(outputs, batch):
        logits, labels = outputs.logits[:, :-1], batch["labels"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    data, recipe = _padded_lm_rows(32, short=16), {"techniques": [{"type": "quant_lsq", "bits": 8}]}  # no padding
    whole, accumulated = (_one_step_update(tmp_path, data, batch, steps, recipe, loss_fn=next_token_loss)
                          for batch, steps in ((32, 1), (16, 2)))
    assert whole.norm() > 0 and (whole - accumulated).norm() / whole.norm() < 1e-5


def _bert_update(tmp_path, batch: int, steps: int, alpha: float) -> torch.Tensor:
    """How one SGD step at LR 1, of `steps` micro-batches of `batch` rows, moves a tiny BERT classifier's head
    (dropout off, so that the micro-batches are one batch's rows)."""
    from hf_helpers import tiny_bert

    def without_dropout(model):
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model

    base, teacher = without_dropout(tiny_bert(layers=2)), without_dropout(tiny_bert(layers=2, seed=1))
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (16, 8), generator=g)
    data = [{"input_ids": row, "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(row[0] > 32)}
            for row in ids]
    session = jointcompress.prepare(model, {"techniques": [{"type": "distill_kd", "temperature": 2.0, "alpha": alpha}]},
                                    total_steps=1, teacher=teacher)
    args = TrainingArguments(output_dir=str(tmp_path / f"b{batch}x{steps}"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=steps, max_steps=1, learning_rate=1.0, optim="sgd",
                             weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    _InOrder(session=session, model=model, args=args, train_dataset=data).train()
    return (model.classifier.weight - base.classifier.weight).detach()


def test_gradient_accumulation_on_a_classifier_whose_loss_ignores_the_count_takes_one_batchs_update(tmp_path):
    """BertForSequenceClassification's forward takes **kwargs (so the Trainer passes num_items_in_batch) but averages
    its loss per micro-batch: left undivided by the accumulation steps, the task term weighed twice its
    distillation's with 2 micro-batches (an update 2x as far at alpha near 0)."""
    for alpha in (0.05, 0.5):
        whole, accumulated = (_bert_update(tmp_path / f"a{alpha}", batch, steps, alpha) for batch, steps in ((16, 1), (8, 2)))
        assert whole.norm() > 0 and (whole - accumulated).norm() / whole.norm() < 1e-4, alpha


def test_save_model_of_a_pruned_class_carries_its_code(tmp_path):
    """Heads removed per layer make a pruned class, which from_pretrained builds only with jointcompress imported
    or from the folder's own modeling_pruned.py; export_folder wrote that file, save_model did not: the folder
    did not load where jointcompress is not installed."""
    from hf_helpers import logits_without_jointcompress

    from jointcompress.hf.pruned import is_pruned_class

    model = tiny_bert(layers=2, seed=0)
    recipe = {"techniques": [{"type": "prune_heads", "sparsity": 0.5, "end": 0.5}]}
    session = jointcompress.prepare(model, recipe, total_steps=4)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    CompressionTrainer(session=session, model=model, args=args, train_dataset=_rows(16)).train()
    session.finalize()
    assert is_pruned_class(model)
    trainer = CompressionTrainer(session=session, model=model, args=args)
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "modeling_pruned.py").is_file()
    assert "auto_map" not in model.config.to_dict()  # the user's model is left as it was
    batch = {k: torch.stack([r[k] for r in _rows(4, seed=3)]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    got = logits_without_jointcompress(tmp_path / "final", "AutoModelForSequenceClassification", batch, tmp_path)
    assert torch.allclose(got, expected, atol=1e-5)

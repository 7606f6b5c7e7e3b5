"""The package with a model on a GPU, fed from ordinary CPU data: compress() in the joint form
under a size target with distillation, a session in a plain loop, a killed and resumed run,
finalize, save, load and int8. Batches follow the model (model_call.call_model); artifacts and
int8 models are made from a CPU copy. Skipped where there is no GPU (CI has none): run on a
GPU machine, where every other test of the suite runs too."""
from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

from jointcompress import compress, finalize, prepare  # noqa: E402
from jointcompress.artifact import load, save  # noqa: E402
from jointcompress.data import accuracy, evaluator, load_digits  # noqa: E402
from jointcompress.deploy import int8_parity, quantize_int8  # noqa: E402
from jointcompress.group_checks import PARITY_RTOL, tolerance  # noqa: E402
from jointcompress.pipeline import builder_for  # noqa: E402
from jointcompress.pipeline import train_teacher  # noqa: E402
from jointcompress.recipe import parse_recipe  # noqa: E402
from jointcompress.targets import target_bytes  # noqa: E402

CUDA = torch.device("cuda")

JOINT = {"model": "lenet300", "mode": "joint", "target": {"ratio": 30.0}, "techniques": [
    {"type": "quant_lsq", "bits": 4, "zero_level": True, "learn_bits": False},
    {"type": "size_budget", "end": 0.6, "freeze": 0.8},
    {"type": "distill_kd", "cache_teacher": True}],
    "training": {"epochs": 3, "batch_size": 64, "lr": 0.002}}

UNSTRUCTURED = {"mode": "joint", "techniques": [
    {"type": "prune_unstructured", "sparsity": 0.8, "scope": "global", "end": 0.5},
    {"type": "quant_lsq", "bits": 4, "start": 0.3},
    {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7, "cache_teacher": True}],
    "training": {"epochs": 3, "batch_size": 64, "lr": 2e-3},
    "coordination": {"strategy": "scale", "every": 4}}


@pytest.fixture(scope="module")
def trained():
    split = load_digits()
    return split, train_teacher("lenet300", split, 3)


def _on_gpu(model) -> bool:
    return all(t.device.type == "cuda" for t in list(model.parameters()) + list(model.buffers()))


def test_joint_size_target_on_gpu_lands_saves_and_loads_on_cpu(trained, tmp_path):
    split, teacher = trained
    recipe = parse_recipe(JOINT)
    gpu_teacher = copy.deepcopy(teacher).to(CUDA)
    model = copy.deepcopy(teacher).to(CUDA)
    result = compress(model, recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test),
                      teacher=gpu_teacher)
    assert _on_gpu(model) and result.metrics["accuracy"] > 0.5
    x = split.x_test[:256]
    with torch.no_grad():
        masked = model(x.to(CUDA)).cpu()
    spec = result.finalize()
    with torch.no_grad():
        finalized = model(x.to(CUDA)).cpu()
    assert (masked - finalized).abs().max().item() <= 1e-4 * max(1.0, masked.abs().max().item())
    manifest = save(model, spec, tmp_path / "a", builder=builder_for("lenet300", split),
                    example_inputs=result.example_inputs)
    goal = target_bytes(teacher, recipe.target)
    assert abs(manifest["weights_file_bytes"] - goal) / goal < 0.02
    assert _on_gpu(model)  # saving left the GPU model where it was
    loaded = load(tmp_path / "a", builder_for("lenet300", split))
    with torch.no_grad():
        assert (loaded(x) - finalized).abs().max().item() <= 1e-4 * max(1.0, finalized.abs().max().item())
    assert accuracy(model, split.x_test, split.y_test) == pytest.approx(accuracy(loaded, split.x_test, split.y_test),
                                                                        abs=2 / len(split.y_test))


def test_unstructured_run_on_gpu_reaches_sparsity_and_its_int8_model_agrees(trained, tmp_path):
    split, teacher = trained
    model = copy.deepcopy(teacher).to(CUDA)
    result = compress(model, UNSTRUCTURED, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test),
                      teacher=copy.deepcopy(teacher).to(CUDA))
    spec = finalize(model, result.example_inputs)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros >= 0.79
    q = quantize_int8(model, spec, split.x_train[:256], split.x_train[:1], workdir=tmp_path)
    assert q.parity["top1_agreement"] >= 0.95
    rep = int8_parity(model, q, (split.x_test, split.y_test))
    assert abs(rep.metric_delta) <= 0.03


def test_session_in_a_plain_loop_on_gpu_with_cpu_batches(trained):
    """The user's loop hands CPU batches to the session; the model is on the GPU."""
    split, teacher = trained
    model = copy.deepcopy(teacher).to(CUDA)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(split.x_train, split.y_train),
                                         batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    steps = 2 * len(loader)
    session = prepare(model, {"techniques": [{"type": "prune_unstructured", "sparsity": 0.7, "end": 0.5},
                                             {"type": "quant_lsq", "bits": 4},
                                             {"type": "distill_kd", "alpha": 0.5}]},
                      total_steps=steps, teacher=copy.deepcopy(teacher).to(CUDA),
                      example_inputs=split.x_train[:2])
    optimizer = torch.optim.Adam(session.param_groups(lr=1e-3))
    session.bind(optimizer)
    for _ in range(2):
        for batch in loader:
            terms = session.forward_terms(batch)
            optimizer.zero_grad()
            session.backward(terms)
            session.before_step(); optimizer.step(); session.after_step()
    assert _on_gpu(model)
    spec = session.finalize()
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) >= 0.69
    assert spec.layers and accuracy(model, split.x_test, split.y_test) > 0.5


def test_a_resumed_gpu_run_ends_where_the_uninterrupted_one_ends(trained, tmp_path):
    """Checkpoints of a GPU run (CUDA RNG, cached teacher logits on the GPU) resume to the same model."""
    split, teacher = trained

    class Stop:
        def on_step(self, trainer, step, out):
            if step == 20:
                raise KeyboardInterrupt

    def run(run_dir, callbacks=(), resume=False):
        torch.manual_seed(0)
        model = copy.deepcopy(teacher).to(CUDA)
        result = compress(model, UNSTRUCTURED, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test),
                          teacher=copy.deepcopy(teacher).to(CUDA), callbacks=list(callbacks), run_dir=run_dir,
                          resume=resume, checkpoint_every=5)
        return model, result

    full, _ = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", [Stop()])
    resumed, result = run(tmp_path / "cut", resume=True)
    assert any(e["event"] == "resumed" for e in result.history.events)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_teacher_cache_moves_to_the_device_of_the_logits():
    from jointcompress.session.teacher import TeacherCache

    cache = TeacherCache.from_state({"idx": torch.tensor([0, 1]), "logits": torch.ones(2, 3)})  # a checkpoint's
    hit = cache.get(torch.tensor([1, 0], device=CUDA))  # cached before the run was resumed on the GPU
    assert hit.device.type == "cuda" and hit.tolist() == [[1.0] * 3] * 2
    idx = torch.tensor([1, 2], device=CUDA)
    assert cache.get(idx) is None
    cache.put(idx, torch.full((2, 3), 2.0, device=CUDA))
    got = cache.get(torch.tensor([0, 2], device=CUDA))
    assert got.device.type == "cuda" and got.tolist() == [[1.0] * 3, [2.0] * 3]


def test_hf_classifier_on_gpu_compresses_with_dict_batches():
    pytest.importorskip("transformers")
    from hf_helpers import tiny_bert

    from jointcompress.hf.wrapper import SequenceClassifier, pack, tensor_loader
    from jointcompress.hf.wrapper import accuracy as hf_accuracy

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 21, (48, 12), generator=g)
    mask = torch.ones_like(ids)
    labels = (ids[:, 1] > 12).long()
    data = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    x = pack(ids, mask)
    teacher = SequenceClassifier(tiny_bert(layers=2, seed=1)).to(CUDA)
    student = SequenceClassifier(tiny_bert(layers=2, seed=0)).to(CUDA)
    recipe = {"training": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "seed": 0}, "techniques": [
        {"type": "prune_heads", "sparsity": 0.5, "end": 0.6}, {"type": "quant_lsq", "bits": 4, "targets": ["*encoder.layer.*"]},
        {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]}
    result = compress(student, recipe, tensor_loader(data, 16, seed=0), lambda m: {"accuracy": hf_accuracy(m, x, labels)},
                      teacher=teacher)
    heads = next(t for t in result.techniques if t.kind == "prune_heads")
    assert heads.at_target() and _on_gpu(student)
    assert 0.0 <= result.metrics["accuracy"] <= 1.0


def test_structured_run_on_gpu_removes_channels_and_its_artifact_loads_on_cpu(tmp_path):
    """prune_structured (learned scores) with LSQ and PCGrad on a CNN on the GPU: finalize removes the
    channels physically (Torch-Pruning on the GPU model), and the artifact rebuilds it on the CPU."""
    split = load_digits()
    teacher = train_teacher("lenet5", split, 2)
    model = copy.deepcopy(teacher).to(CUDA)
    recipe = {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "criterion": "learned", "end": 0.6},
                             {"type": "quant_lsq", "bits": 8, "start": 0.3},
                             {"type": "distill_kd", "alpha": 0.5}],
              "training": {"epochs": 2, "batch_size": 64, "lr": 2e-3}, "coordination": {"strategy": "pcgrad", "every": 2}}
    result = compress(model, recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test),
                      teacher=copy.deepcopy(teacher).to(CUDA))
    x = split.x_test[:128]
    with torch.no_grad():
        masked = model(x.to(CUDA)).cpu()
    dense = sum(p.numel() for p in model.parameters())
    spec = result.finalize()
    assert sum(p.numel() for p in model.parameters()) < 0.8 * dense and _on_gpu(model)
    with torch.no_grad():
        finalized = model(x.to(CUDA)).cpu()
    # cuDNN convolutions may run in TF32 (float16's mantissa): finalize's own parity bound is then wider
    assert (masked - finalized).abs().max().item() <= tolerance(masked.to(CUDA)) * masked.abs().max().item()
    save(model, spec, tmp_path / "s", builder=builder_for("lenet5", split), example_inputs=result.example_inputs)
    loaded = load(tmp_path / "s", builder_for("lenet5", split))
    with torch.no_grad():  # on the CPU, in float32 both: the artifact holds exactly the finalized model
        on_cpu = copy.deepcopy(model).cpu()(x)
        assert (loaded(x) - on_cpu).abs().max().item() <= 1e-5 * max(1.0, on_cpu.abs().max().item())


def test_parity_tolerance_widens_for_float32_on_a_gpu_only_while_tf32_is_allowed():
    logits = torch.ones(2, 3, device=CUDA)
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
        assert tolerance(logits) == PARITY_RTOL
        torch.backends.cudnn.allow_tf32 = True
        assert tolerance(logits) == 16 * 2.0 ** -10
        assert tolerance(logits.cpu()) == PARITY_RTOL
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def test_hf_heads_and_ffn_finalize_on_gpu_keeps_the_logits():
    pytest.importorskip("transformers")
    from hf_helpers import tiny_bert

    from jointcompress.hf.finalize import finalize_hf
    from jointcompress.hf.wrapper import SequenceClassifier, pack, tensor_loader

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 21, (48, 12), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 1] > 12).long()}
    model = SequenceClassifier(tiny_bert(layers=2, seed=0)).to(CUDA)
    recipe = {"training": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "seed": 0}, "techniques": [
        {"type": "prune_heads", "sparsity": 0.5, "end": 0.6}, {"type": "prune_ffn", "sparsity": 0.5, "end": 0.6}]}
    result = compress(model, recipe, tensor_loader(data, 16, seed=0), lambda m: {"accuracy": 0.0})
    x = pack(ids, data["attention_mask"])
    model.eval()
    with torch.no_grad():
        masked = model(x.to(CUDA)).cpu()
    hf = finalize_hf(model, result.techniques)
    assert next(hf.parameters()).device.type == "cuda"
    with torch.no_grad():
        assert (model(x.to(CUDA)).cpu() - masked).abs().max().item() <= 1e-4


def test_sequential_size_target_trains_on_gpu_through_the_pipeline(trained, tmp_path):
    """The command line's path with a device (pipeline.compress_and_save): sequential under a size
    target steers its per-layer sparsity from the GPU run's state; the model comes back on the CPU."""
    from jointcompress.compare import variant_recipe
    from jointcompress.demo import demo_recipe
    from jointcompress.pipeline import compress_and_save
    from jointcompress.targets import resolve_target

    split, teacher = trained
    targeted = demo_recipe("lenet300", 4, 30.0)
    budgets = resolve_target(teacher, targeted, split.x_train[:2])
    recipe = variant_recipe(budgets, "sequential", 0, targeted, teacher, split.x_train[:2])
    outcome = compress_and_save("seq", teacher, recipe, split, builder_for("lenet300", split), tmp_path, device=CUDA)
    assert next(outcome.model.parameters()).device.type == "cpu"
    assert next(teacher.parameters()).device.type == "cpu"  # the caller's teacher stays where it was
    assert any(e["event"] in ("size_steering", "size_trim") for e in outcome.result.history.events)
    goal = target_bytes(teacher, targeted.target)
    assert outcome.row["file_bytes"] <= 1.05 * goal and outcome.row["accuracy"] > 0.5


def _trainer_parts():
    """transformers' TrainingArguments, CompressionTrainer, 24 rows of token ids, a tiny BERT and its teacher."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from hf_helpers import tiny_bert
    from transformers import TrainingArguments

    from jointcompress.integrations.hf_trainer import CompressionTrainer

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (24, 10), generator=g)
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": int(ids[i, 1] > 30)}
            for i in range(24)]
    return TrainingArguments, CompressionTrainer, rows, tiny_bert(layers=2, seed=0), tiny_bert(layers=2, seed=1)


def test_trainer_moving_the_model_to_the_gpu_after_prepare_takes_the_session_along(tmp_path):
    """prepare() on the CPU, then the transformers Trainer moves the model to the GPU in its constructor:
    CompressionTrainer moves the masks and the teacher after it (session.to)."""
    TrainingArguments, CompressionTrainer, rows, model, teacher = _trainer_parts()
    session = prepare(model, {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5,
                                              "targets": ["*encoder.layer.*"]},
                                             {"type": "quant_lsq", "bits": 4, "targets": ["*encoder.layer.*"]},
                                             {"type": "distill_kd", "alpha": 0.5}]}, total_steps=4, teacher=teacher)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=6, learning_rate=1e-3,
                             report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=rows)
    trainer.train()
    prune = next(t for t in session.techniques if t.kind == "prune_unstructured")
    assert _on_gpu(model) and next(teacher.parameters()).device.type == "cuda"
    assert prune.at_target() and all(m.scores.device.type == "cuda" for m in prune.masks.values())


def test_cli_trains_an_hf_recipe_on_the_gpu_and_writes_everything_from_the_cpu(tmp_path):
    """`jointcompress compress HF_RECIPE --device cuda`: heads, FFN neurons, LSQ and KD train on the GPU;
    the artifact, the HF folder and the int8 ONNX model are written from the CPU, and the saved
    artifact gives the finalized student's dev accuracy."""
    pytest.importorskip("transformers")
    import json

    import yaml
    from hf_helpers import sst2_folder, teacher_folder
    from typer.testing import CliRunner

    from jointcompress.cli import app

    teacher_dir, data = teacher_folder(tmp_path, heads=4, ffn=64), sst2_folder(tmp_path, seed=0)
    rec = {"name": "hf-tiny-gpu", "hf": {"student_layers": [0, 3], "max_length": 16},
           "training": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "seed": 0},
           "techniques": [{"type": "prune_heads", "sparsity": 0.5, "end": 0.6}, {"type": "prune_ffn", "sparsity": 0.5, "end": 0.6},
                          {"type": "quant_lsq", "bits": 4, "targets": ["*encoder.layer.*"]},
                          {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5, "cache_teacher": True}]}
    path, out = tmp_path / "r.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(rec))
    res = CliRunner().invoke(app, ["compress", str(path), "--data", str(data), "--weights", str(teacher_dir), "--out", str(out),
                                   "--device", "cuda"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["student"]["heads_per_layer"]) == 4 and sum(summary["student"]["intermediate_per_layer"]) == 64
    assert summary["artifact"]["dev_accuracy"] == pytest.approx(summary["student"]["dev_accuracy"], abs=1 / 8)
    assert (out / "onnx" / "model_int8.onnx").is_file() and summary["int8"]["logits_vs_fp32_student"]["within_tolerance"]
    assert summary["int8"]["latency"]["teacher_fp32_torch"]["batch1_ms"] > 0  # the teacher timed back on the CPU


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_sixteen_bit_training_on_gpu_lands_the_target_and_evaluates_in_float32(trained, precision):
    """training.precision on a GPU: the forward in 16-bit autocast (fp16 with the loop's GradScaler), the
    weights float32; the joint form lands its size target and reaches the float32 run's accuracy."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    split, teacher = trained
    accuracy_of = {}
    for p in ("fp32", precision):
        recipe = parse_recipe({**JOINT, "training": {**JOINT["training"], "precision": p}})
        model = copy.deepcopy(teacher).to(CUDA)
        result = compress(model, recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test),
                          teacher=copy.deepcopy(teacher).to(CUDA))
        assert _on_gpu(model) and all(q.dtype == torch.float32 for q in model.parameters())
        assert not [e for e in result.history.events if e["event"] == "nonfinite"]
        accuracy_of[p] = result.metrics["accuracy"]
    assert accuracy_of[precision] > accuracy_of["fp32"] - 0.05, accuracy_of


def test_trainer_with_fp16_trains_through_the_session_on_gpu(tmp_path):
    """transformers' fp16=True: accelerate's GradScaler scales the session's terms (session/loss_scale.py)."""
    TrainingArguments, CompressionTrainer, rows, model, teacher = _trainer_parts()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    session = prepare(model, {"mode": "joint", "target": {"ratio": 4}, "coordination": {"strategy": "pcgrad", "every": 1},
                              "techniques": [{"type": "quant_lsq", "bits": 4}, {"type": "distill_kd", "alpha": 0.5}]},
                      total_steps=4, teacher=teacher)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=6, learning_rate=1e-3,
                             gradient_accumulation_steps=2, fp16=True, report_to=[], save_strategy="no",
                             disable_tqdm=True, seed=0)
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=rows)
    assert trainer.accelerator.scaler is not None
    trainer.train()
    assert session.step == 4 and _on_gpu(model)
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p.detach().cpu(), before[n])]
    assert moved and all(torch.isfinite(p).all() for p in model.parameters())

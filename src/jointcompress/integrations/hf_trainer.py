"""transformers.Trainer through the compression session.

    session = jointcompress.prepare(model, recipe, total_steps=steps, teacher=teacher)
    trainer = CompressionTrainer(session=session, model=model, args=args, train_dataset=ds)
    trainer.train()
    spec = session.finalize()

CompressionTrainer changes three things of the Trainer: the loss goes through the session
(task term from the model's own loss or the session's loss_fn, or the Trainer's own loss where
label_smoothing_factor or compute_loss_func makes it another, plus distillation and every
technique's terms), the backward is the session's coordinated backward, and the optimizer
also holds the techniques' parameters (mask scores, LSQ step sizes; those that attach later
are added when they do). CompressionCallback runs the techniques' hooks around the
Trainer's optimizer step and advances the schedule. Gradient accumulation works (each
micro-batch's terms are scaled like the Trainer scales its loss, and the step's micro-batches are
coordinated together on the last one, before the Trainer clips); so does fp16 mixed precision (the
terms are scaled by the Trainer's GradScaler, session/loss_scale.py); one process only. Each
checkpoint-N folder also holds the session's state (SESSION_FILE), which
train(resume_from_checkpoint=...) restores before the Trainer loads the weights.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings

import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as err:  # transformers is the optional `hf` extra
    raise ImportError(f"jointcompress.integrations.hf_trainer needs transformers ({err}); pip install jointcompress[hf]") from None

from ..errors import RecipeError
from ..model_call import model_device
from ..session.norm_statistics import RandomStates, tracked_norms
from ..session.outputs import model_loss
from ..session.session import CompressionSession

SESSION_FILE = "jointcompress_session.pt"  # beside the Trainer's files in each checkpoint-N folder


class CompressionCallback(TrainerCallback):
    """The techniques' hooks at the Trainer's step boundaries."""

    def __init__(self, session: CompressionSession):
        self.session = session

    def on_train_begin(self, args, state, control, **kwargs):
        """The Trainer's optimizer steps against the session's plan, said before training: fewer, and the model
        finalize bakes has not reached its targets (said only then, after training: total_steps counted in batches
        under gradient accumulation); more, and the last ones train at the targets. A warning, not a refusal: a
        train() may run part of the plan on purpose (a look at the first steps)."""
        planned, runs = self.session.plan.total_steps, state.max_steps
        if runs == planned:
            return
        how = (f"the Trainer runs {runs} optimizer steps (batches per epoch x num_train_epochs / "
               f"gradient_accumulation_steps {args.gradient_accumulation_steps}, or max_steps), the session was "
               f"prepared for total_steps={planned}")
        then = (f"so the techniques will not reach their targets: finalize then keeps what they reached by step {runs}"
                if runs < planned else f"so the techniques reach their targets by step {planned} and the last "
                f"{runs - planned} steps train at them")
        warnings.warn(f"CompressionTrainer: {how}, {then} (prepare with total_steps={runs} to spread the schedule over "
                      "this run)", UserWarning, stacklevel=2)

    def on_step_begin(self, args, state, control, **kwargs):
        self.session.begin_step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.session.before_step()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.session.after_step()
        # the Trainer zeroes the model's gradients; technique parameters outside the model too
        for t in self.session.techniques:
            for g in t.parameters() if t.attached else []:
                for p in g["params"]:
                    p.grad = None


class CompressionTrainer(Trainer):
    """A transformers Trainer whose loss and backward go through a CompressionSession."""

    def __init__(self, *args, session: CompressionSession, **kwargs):
        if not isinstance(session, CompressionSession):
            raise RecipeError("CompressionTrainer(session=...): give the session jointcompress.prepare(model, recipe, ...) returned")
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1:
            raise RecipeError("CompressionTrainer runs in one process; for data-parallel compression use "
                              "jointcompress.compress under torchrun")
        if session.loss_fn is not None and self._trainer_task_loss():
            raise RecipeError("CompressionTrainer: the task loss is given twice, to prepare(loss_fn=...) and to the Trainer "
                              "(label_smoothing_factor or compute_loss_func); keep one of them")
        if not {id(p) for p in session.model.parameters()} & {id(p) for p in self.model.parameters()}:
            raise RecipeError("CompressionTrainer(model=...) is not the model the session was prepared on: the Trainer "
                              "would train it and finalize would bake the session's, untrained and uncompressed. Give "
                              "the Trainer the model passed to jointcompress.prepare (session.model)")
        self.session = session.to(model_device(self.model))  # the Trainer moved the model after prepare()
        self.add_callback(CompressionCallback(session))

    def create_optimizer(self, model=None):
        """The Trainer's optimizer class and settings over the session's groups: the model's
        weights at args.learning_rate / weight_decay, technique parameters with their own LR
        and no weight decay (it would pull LSQ's log step sizes toward a step of 1)."""
        if self.optimizer is None:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            groups = self.session.param_groups(lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
            names = {id(p): n for n, p in (model or self.model).named_parameters()}
            # by name: a resumed session registers its parametrizations anew, which reorders the model's parameters,
            # and the Trainer's saved optimizer state is matched to them by position
            groups[0]["params"] = sorted(groups[0]["params"], key=lambda p: names.get(id(p), ""))
            for g in groups[1:]:
                g.setdefault("weight_decay", 0.0)
            self.optimizer = cls(groups, **kwargs)
        self.session.late_group_defaults = {"weight_decay": 0.0}  # technique groups that attach later, too
        self.session.bind(self.optimizer)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's scheduler, bound to the session: the groups of techniques that attach
        later (quant_lsq with `start: 0.3`) follow it at their own learning rate."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        self.session.bind(self.optimizer, scheduler)
        return scheduler

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, and the session's state beside it: the masks, scores and schedule
        position the saved weights (stored under their parametrizations) belong to."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            from ..io import atomic_write_bytes

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            buffer = io.BytesIO()
            torch.save(self.session.state_dict(), buffer)
            atomic_write_bytes(os.path.join(folder, SESSION_FILE), buffer.getvalue())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save; called by the user before session.finalize(), the session's state is written
        beside it and the call is said. The folder holds the weights under their masks and quantizers
        (keys ending in parametrizations.weight.original), which from_pretrained reported missing and
        initialized at random: the model loaded untrained, with no word from jointcompress. After finalize, a
        folder of a model trained with quant_lsq activations: true loads without its input rounding (its logits
        differ a little), which is said as export_folder says it; a model whose config cannot build its pruned
        widths (a vision model's channels) is refused before writing, as export_folder refuses it."""
        finalized = self.session.spec is not None and not _internal_call
        if finalized:
            from ..hf.export import check_config_builds

            check_config_builds(self.model, "CompressionTrainer.save_model")
        super().save_model(output_dir, _internal_call)
        if _internal_call or not self.args.should_save:
            return
        folder = output_dir or self.args.output_dir
        if finalized:  # a folder from_pretrained loads, less any input rounding
            from ..hf.export import add_remote_code, warn_input_rounding

            add_remote_code(self.model, folder)  # a pruned class loads without jointcompress too
            warn_input_rounding(self.model, stacklevel=4)
            return
        from ..io import atomic_write_bytes

        buffer = io.BytesIO()
        torch.save(self.session.state_dict(), buffer)
        atomic_write_bytes(os.path.join(folder, SESSION_FILE), buffer.getvalue())
        warnings.warn(f"CompressionTrainer.save_model before session.finalize(): {folder} holds the weights under their "
                      "masks and quantizers, which from_pretrained does not read (it would load those layers "
                      f"untrained); the session's state is beside them ({SESSION_FILE}). Call spec = session.finalize() "
                      "and then trainer.save_model() for a folder from_pretrained loads (or jointcompress.hf.export.export_folder; "
                      "jointcompress.hf.artifact.save_hf_artifact for the packed one)", UserWarning, stacklevel=2)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """train(resume_from_checkpoint=...): the session's state first (it rebuilds the masks and
        quantizers the checkpoint's weights are stored under), then the Trainer's own loading. Without
        it the Trainer's load, which keeps what fits, dropped every compressed weight silently."""
        path = os.path.join(resume_from_checkpoint, SESSION_FILE)
        if not os.path.isfile(path):
            raise RecipeError(f"{resume_from_checkpoint}: no {SESSION_FILE}, so the compression session's state (masks, "
                              "quantizers, schedule) cannot be restored; resume from a checkpoint CompressionTrainer wrote")
        self.session.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # saved on a GPU too
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """load_best_model_at_end: the best checkpoint among those of the compressed model (at or after the step
        every technique has ended its ramp, as the built-in loop chooses), with its session state too. The Trainer
        loaded its weights alone, so the masks, scores and schedule stayed at the last step's: a model no
        evaluation had seen; and its best could be an early checkpoint, pruned to a fraction of the target."""
        best, score = self._best_compressed_checkpoint()
        if best is None:
            warnings.warn(f"load_best_model_at_end: no checkpoint was evaluated at or after step "
                          f"{self.session.final_from()}, where every technique is at its target (the best, "
                          f"{self.state.best_model_checkpoint}, was not compressed yet); the model of the last step is "
                          "kept. Evaluate and save after that step (eval_steps / save_steps)", UserWarning, stacklevel=2)
            return
        if best != self.state.best_model_checkpoint:  # the Trainer's line "Loading best model ... (score: ...)" reads it
            self.state.best_model_checkpoint, self.state.best_metric = best, score
        path = os.path.join(best, SESSION_FILE)
        if os.path.isfile(path):
            self.session.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        super()._load_best_model()
        self._best_loaded = True

    def _best_compressed_checkpoint(self) -> tuple[str | None, float | None]:
        """(folder, score): the Trainer's best checkpoint where it is of the compressed model (its score the
        Trainer's), else the best-scored checkpoint saved at or after session.final_from() (by the Trainer's
        metric_for_best_model and greater_is_better), else (None, None)."""
        best, final = self.state.best_model_checkpoint, self.session.final_from()
        if best is None or _checkpoint_step(best) >= final:
            return best, self.state.best_metric
        scored = {path: value for path, value in self._scores().items() if _checkpoint_step(path) >= final}
        if not scored:
            return None, None
        pick = max if self.args.greater_is_better else min
        chosen = pick(scored, key=scored.get)
        return chosen, scored[chosen]

    def _scores(self) -> dict[str, float]:
        """{checkpoint folder: its metric_for_best_model}, of the checkpoints saved with the session's state."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        key = self.args.metric_for_best_model or "loss"
        key = key if key.startswith("eval_") else f"eval_{key}"
        folder = os.path.dirname(self.state.best_model_checkpoint)
        scored = {os.path.join(folder, f"{PREFIX_CHECKPOINT_DIR}-{e['step']}"): e[key] for e in self.state.log_history
                  if key in e and "step" in e}
        return {path: value for path, value in scored.items() if os.path.isfile(os.path.join(path, SESSION_FILE))}

    def evaluate(self, *args, **kwargs):
        """The Trainer's evaluation, after BatchNorm's running statistics are re-estimated on the first
        training.recalibrate_norms training batches for the weights as they are now (as the built-in loop
        does, session/norm_statistics.py); the RNG states the data loading draws from are put back."""
        self._recalibrate_norms()
        return super().evaluate(*args, **kwargs)

    def train(self, *args, **kwargs):
        """The Trainer's training, then the statistics re-estimated for the weights it ends with: a run that
        never evaluates (eval_strategy "no") left the running averages of weights that had moved on, and
        those were what finalize and save kept. Not where the weights were just evaluated (their statistics are
        the evaluation's) or the best checkpoint was loaded back (its statistics are the ones it was scored with)."""
        self._recalibrated_at = None  # only a pass of this training counts (a second train() may end at the same step)
        self._best_loaded = False
        out = super().train(*args, **kwargs)
        if not self._best_loaded and getattr(self, "_recalibrated_at", None) != self.state.global_step:
            self._recalibrate_norms()
        return out

    def _recalibrate_norms(self) -> None:
        if self.train_dataset is not None and tracked_norms(self.model) and self.session.recipe.training.recalibrate_norms:
            if getattr(self, "_norm_batches", None) is None:  # one loader for every evaluation: accelerate keeps each it prepares
                self._norm_batches = self.get_train_dataloader()
            with RandomStates(self._norm_batches):
                self.session.recalibrate_norms(self._norm_batches)
            self._recalibrated_at = self.state.global_step

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / max(1, self.current_gradient_accumulation_steps)
        trainer_loss = self._trainer_task_loss()
        with self.compute_loss_context_manager():
            if trainer_loss:
                with _named_as_stock(self.accelerator.unwrap_model(model)):
                    task, outputs = super().compute_loss(model, dict(inputs), return_outputs=True,
                                                         num_items_in_batch=num_items_in_batch)
                terms = self.session.loss(outputs, inputs, task_loss=task)
            else:
                given = self._loss_kwargs(num_items_in_batch) if self.session.loss_fn is None else {}
                outputs = model(**inputs, **given)
                terms = self.session.loss(outputs, inputs)
        if trainer_loss:
            scaled = self._task_scaled_for_accumulation(num_items_in_batch)
        else:  # the task term is the model's own loss, normalized over the step's tokens, only if it took the count
            scaled = bool(given) and model_loss(outputs) is not None and self._loss_takes_count(model, inputs, given)
        task_scale = 1.0 if scaled else scale
        token_scale = self._token_share(inputs, num_items_in_batch)  # a token-level distillation's share of the step
        terms = {k: v * (task_scale if k == "task" else token_scale if k == "distill" and token_scale is not None
                         else scale) for k, v in terms.items()}
        self.session.backward(terms, scaler=getattr(self.accelerator, "scaler", None))  # fp16: the Trainer's GradScaler
        if self.accelerator.sync_gradients:  # the step's last micro-batch: settle before the Trainer clips
            self.session.settle_gradients()
        return sum(v.detach() for v in terms.values())

    def _loss_kwargs(self, num_items_in_batch) -> dict:
        """num_items_in_batch for a model whose loss takes it, as the stock Trainer passes it: the model's loss is
        then summed over the micro-batch's tokens and divided by the step's, not averaged per micro-batch (with
        gradient accumulation over padded rows, a micro-batch of short rows weighed as much as one of long rows,
        and the update differed from one batch's by 66% of its norm)."""
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            return {"num_items_in_batch": num_items_in_batch}
        return {}

    def _loss_takes_count(self, model, inputs, given: dict) -> bool:
        """Whether the model's loss really divides by the num_items_in_batch it was given. A forward with
        **kwargs is taken to (model_accepts_loss_kwargs), but a classifier such as BertForSequenceClassification
        passes them on to its layers and averages its loss per micro-batch: left undivided by the accumulation
        steps, its task term weighed K times its distillation's (alpha moved with gradient_accumulation_steps) and
        the update was not one batch's. Asked once, where it matters (accumulation): the loss under the count and
        under twice it, in eval mode (no dropout), without gradients."""
        if self.current_gradient_accumulation_steps <= 1:
            return True
        if getattr(self, "_takes_count", None) is None:
            count = given["num_items_in_batch"]
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), self.compute_loss_context_manager():
                    losses = [model_loss(model(**inputs, num_items_in_batch=n)) for n in (count, count * 2)]
            finally:
                model.train(was_training)
            if any(loss is None or not torch.isfinite(loss) or loss == 0 for loss in losses):
                return True  # nothing to read: the Trainer's rule, asked again next time
            self._takes_count = not torch.allclose(losses[0], losses[1], rtol=1e-4, atol=0.0)
        return self._takes_count

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's batches of one optimizer step, and beside them the positions a token-level distillation
        averages over in all of them (_token_share's denominator)."""
        from ..training.micro_batches import distilled_positions

        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        model = self.accelerator.unwrap_model(self.model)
        counts = [distilled_positions(b, model) if isinstance(b, dict) else None for b in batches]
        self._step_positions = None if any(c is None for c in counts) or not counts else float(sum(c.sum() for c in counts))
        return batches, num_items

    def _token_share(self, inputs, num_items_in_batch) -> float | None:
        """This micro-batch's share of the step's positions for a token-level distillation term, which averages
        over the micro-batch's own (its attention_mask: for a causal LM one more per row than the shifted labels
        num_items_in_batch counts, so shares of that count summed to more than 1 and the update was another one
        batch's); None where labels are per sample or the step's count is unknown (then 1 / the accumulation)."""
        from ..training.micro_batches import distilled_positions

        total = getattr(self, "_step_positions", None)
        if num_items_in_batch is None or not total or not isinstance(inputs, dict):
            return None
        mine = distilled_positions(inputs, self.accelerator.unwrap_model(self.model))
        return float(mine.sum()) / total if mine is not None else None

    def _trainer_task_loss(self) -> bool:
        """Whether the task term is the Trainer's own loss: with label_smoothing_factor or a compute_loss_func
        the model's loss is not what the Trainer trains (the session's default reads the model's)."""
        return self.label_smoother is not None or self.compute_loss_func is not None

    def _task_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """The Trainer's rule for its own loss: normalized over the step's accumulated batch already (by
        num_items_in_batch, or a compute_loss_func), so not divided by the accumulation steps again."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Evaluation loss (training goes through training_step): the terms the model is fit to, task and
        distillation. The compression's own terms (size, sparsity, quantization) measure where the budget stands,
        not the fit, and the size term goes negative under its goal: summed in, eval_loss was no measure for
        metric_for_best_model."""
        from ..coordination import PRIMARY

        outputs = model(**inputs)
        terms = self.session.loss(outputs, inputs)
        loss = sum(v for k, v in terms.items() if k in PRIMARY)
        return (loss, outputs) if return_outputs else loss


@contextlib.contextmanager
def _named_as_stock(model):
    """The Trainer shifts the labels of its label smoothing only for a class it names a causal LM (by class name); a
    pruned causal class (JCLlamaForCausalLM, JCGPT2LMHeadModel after conv1d_to_linear, ...) had each token's own id
    smoothed as its target, without a word. Such a model answers to its stock class's name for that call."""
    from ..hf.modeling_pruned import CAUSAL, PRUNED_CLASSES

    if not isinstance(model, tuple(PRUNED_CLASSES[t][1] for t in CAUSAL)):
        yield
        return
    stock = next(c for c in type(model).__mro__[1:] if c.__module__.startswith("transformers."))
    model._get_name = lambda: stock.__name__
    try:
        yield
    finally:
        del model._get_name


def _checkpoint_step(folder: str) -> int:
    """The global step of a Trainer checkpoint-N folder (-1 for a name that carries none)."""
    tail = os.path.basename(os.path.normpath(folder)).rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1

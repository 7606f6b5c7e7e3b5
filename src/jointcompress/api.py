"""The public verbs: compress a model with a recipe; finalize it; measure it."""
from __future__ import annotations

import contextlib
import contextvars
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from . import distributed as _dist
from . import techniques as tech
from .errors import DataError, RecipeError, UnsupportedModelError
from .io import run_lock
from .joint_form import as_joint_form
from .layer_types import COMPRESSIBLE
from .session.checks import check_model_tensors, check_teacher, non_tensor_message, non_tensor_state, refuse_scripted
from .data import EVALUATOR_SAMPLE
from .model_call import evaluating, model_device
from .session.outputs import LABEL_KEYS, call_model, describe, first_rows, split_batch
from .session.teacher import TEACHER_INPUT_ERRORS
from .training import History, Trainer
from .training.metrics import evaluated
from .plan import make_plan
from .recipe import Recipe, parse_recipe, warn_compresses_nothing, warn_no_steps_after, warn_unread_quant_start


@dataclass
class Result:
    """What compress() returns: the compressed model (masks and quantizers still attached,
    so it can keep training; call finalize() to make it permanent), the history and the
    final metrics of the kept (best) state."""

    model: nn.Module
    history: History
    metrics: dict[str, float]
    recipe: Recipe
    techniques: list = field(default_factory=list)
    example_inputs: Any = None
    target: Any = None  # the target the recipe asked for (`recipe` holds what it resolved to)
    _spec: Any = field(default=None, init=False, repr=False, compare=False)

    def finalize(self):
        """Make the compression permanent as session.finalize() does (one code path:
        session.finalize.finalize_compressed), with the recipe that ran recorded in the spec so the
        artifact's manifest holds it. Hugging Face head / FFN / layer pruning removes the units
        physically and takes the mask hooks off; the core finalize alone left them masked by hooks,
        and save wrote the unmasked weights. A second call returns the first call's spec: the model
        is finalized already, and finalizing it again found nothing and returned an empty spec."""
        from .session.finalize import finalize_compressed

        if self._spec is None:
            self._spec = finalize_compressed(self.model, self.techniques, self.recipe, self.example_inputs)
        return self._spec

    def latency_verdict(self, uncompressed: nn.Module, rounds: int = 30) -> dict[str, Any]:
        """Whether a latency target was met: the compressed and the `uncompressed` model timed together
        at the target's batch the honest way (interleaved medians, each also alone; PyTorch fp32), as
        `jointcompress compress` judges it, on the model as finalize leaves it (a finalized copy where
        finalize() was not called yet: masked channels removed, no parametrization on the clock).
        Returns goal_ms, interleaved_ms, alone_ms, speedup, met and flagged (a contender whose alone
        and interleaved medians differ by more than 20%)."""
        from .errors import RecipeError
        from .latency_targets import latency_against_target
        from .techniques.size_estimate import finalized_copy

        if self.target is None or not self.target.is_latency:
            raise RecipeError(f"latency_verdict: the recipe asked for {self.target or 'no target'}, not a latency "
                              "target (target: {latency_ms: MS, batch: N} or {speedup: X, batch: N}); time any two "
                              "models with jointcompress.deploy.timing instead")
        timed = self.model if self._spec is not None else finalized_copy(self.model, self.example_inputs)[0]
        return latency_against_target(uncompressed, timed, self.example_inputs, self.target, rounds=rounds)

    def summary(self) -> dict[str, Any]:
        out = dict(self.metrics)
        for t in self.techniques:
            out.update({f"{t.kind}.{k}": v for k, v in t.metrics().items()})
        out["wall_seconds"] = self.history.wall_seconds
        return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _same_data_on_every_rank(train_data, dist: "_dist.DistContext", device: torch.device) -> None:
    """The run shards one data set over the ranks, so every rank must hold the same: with other contents each
    rank trained on its own (and a resume was refused as 'other data'); with another length the ranks took other
    numbers of batches and blocked in an all-reduce without a word. Rank 0's fingerprint is checked on every rank."""
    from .data import fingerprint, same_fingerprint

    if not torch.distributed.is_initialized():  # a context without a group (nothing to compare with)
        return
    # a dataset by its length alone: its items may be augmented at random (other on every rank and read) and
    # reading them would draw from the generators training draws from
    mine = fingerprint(list(train_data)) if isinstance(train_data, (tuple, list)) else [[[len(train_data)]]]
    first = dist.broadcast_json(mine, device=device)
    if dist.any(not same_fingerprint(first, mine), device):
        shapes = _shape_and_count(mine)
        here = ("" if same_fingerprint(first, mine) else f"; rank {dist.rank}: {shapes}"
                + (", the same shapes with other values" if shapes == _shape_and_count(first) else ""))
        raise DataError(f"train_data: the ranks hold different data (rank 0: {_shape_and_count(first)}{here}); "
                        "the run shards one data set over the ranks, so give every rank the same (x, y) or dataset, or "
                        "shard it yourself with a DataLoader and a DistributedSampler")


def same_recipe_on_every_rank(recipe: Recipe, dist: "_dist.DistContext | None", device: torch.device,
                              total_steps: int | None = None) -> None:
    """Every rank must run one recipe (and, in a loop of one's own, one total_steps): a rank given other epochs took
    other steps and every rank blocked in a collective with no word (gloo's default: 30 minutes); one given another
    sparsity trained on, rank 0 saved its own artifact, and the other died in gloo's "Connection closed by peer".
    Rank 0's is checked on every rank before anything trains; the refusal names the first fields that differ."""
    from .training.checkpoints import differences

    if dist is None or not torch.distributed.is_initialized():
        return
    mine = {"recipe": recipe.model_dump(mode="json"), "total_steps": total_steps}
    first = dist.broadcast_json(mine, device=device)
    other = dist.lowest_rank(first != mine, device)
    if other is None:
        return
    theirs = dist.broadcast_json(mine, src=other, device=device)
    fields = differences(first, theirs, was="on rank 0")
    raise RecipeError(f"the ranks run different recipes: rank {other} differs from rank 0 in {'; '.join(fields[:3])}"
                      f"{'; ...' if len(fields) > 3 else ''} (now on rank {other}). Every rank must run the same recipe "
                      "(and total_steps): give each process the same file and flags")


def same_teacher_on_every_rank(teacher: nn.Module | None, dist: "_dist.DistContext | None", device: torch.device) -> None:
    """Every rank must distil from one teacher: a teacher made on each rank without a fixed seed (or loaded from
    another file) differed, and the averaged gradient pulled the student toward a mix of them, without a word (the
    data and the recipe were checked, the teacher not). Its weights' digest on rank 0 is checked on every rank."""
    from .checkpoint import state_digest

    if dist is None or not torch.distributed.is_initialized():
        return
    mine = state_digest(teacher) if teacher is not None else None
    first = dist.broadcast_json(mine, device=device)
    other = dist.lowest_rank(first != mine, device)
    if other is None:
        return
    raise RecipeError(f"teacher: the ranks hold different teachers (rank {other}'s weights differ from rank 0's); every "
                      "rank must distil from the same teacher: load one trained teacher's weights on every rank (a "
                      "teacher made or trained on each rank without a fixed seed differs)")


def _same_batch_count(loader, dist: "_dist.DistContext", device: torch.device) -> None:
    """Every rank must take as many steps: a DataLoader whose ranks give other numbers of batches (each rank's own
    DistributedSampler over a data set of another length) ended in gloo's abort ("Received data size doesn't match
    expected size") at the first collective one rank had stopped calling."""
    if not torch.distributed.is_initialized():
        return
    mine = len(loader)
    first = dist.broadcast_json(mine, device=device)
    if dist.any(mine != first, device):
        raise DataError(f"train_data: the ranks' DataLoaders give different numbers of batches an epoch (rank 0: "
                        f"{first}{'' if mine == first else f'; rank {dist.rank}: {mine}'}); every rank must take the "
                        "same steps: give every rank the same dataset (the run shards it over the ranks), or a sampler "
                        "that gives each rank as many batches (a DistributedSampler over the same dataset does)")


def _shape_and_count(prints: list) -> str:
    return ", ".join(f"shape {tuple(p[0])}" if p is not None else "None" for p in prints)


def as_loader(train_data, batch_size: int, seed: int, dist: "_dist.DistContext | None" = None,
              batch_norm: bool = False, device: torch.device | None = None):
    """Accept a DataLoader, a map-style Dataset (batched at `batch_size`, shuffled) or an (x, y)
    pair of tensors.

    Under torch.distributed the data is sharded with a DistributedSampler; for an (x, y)
    pair `batch_size` is the global batch (each rank takes batch_size // world_size). `batch_norm`:
    the model has a BatchNorm, which cannot train on a batch of one sample: a pair whose last batch
    would hold one drops it (a different sample each epoch, as the batches are shuffled). `device`: where the
    ranks' collectives run (the model's: an NCCL group has no CPU tensors).
    """
    from .data import loader

    built = None
    if isinstance(train_data, (tuple, list)) and len(train_data) == 2 and all(isinstance(t, torch.Tensor) for t in train_data):
        n = len(train_data[0])
        if dist is None:
            lone = n % batch_size == 1
        else:  # each rank's share (DistributedSampler pads it to ceil(n / ranks)) in its batches of batch_size // ranks
            lone = -(-n // dist.world_size) % max(1, batch_size // dist.world_size) == 1
            _warn_uneven_batch(batch_size, dist.world_size)
        built = loader(train_data[0], train_data[1], batch_size, shuffle=True, seed=seed, drop_last=batch_norm and n > 1 and lone)
    elif isinstance(train_data, torch.utils.data.Dataset) and not isinstance(train_data, torch.utils.data.IterableDataset) \
            and hasattr(train_data, "__len__"):
        # a dataset given as it is: batched at training.batch_size and shuffled by the run's seed, as a pair of tensors is
        built = torch.utils.data.DataLoader(train_data, batch_size=batch_size, shuffle=True,
                                            generator=torch.Generator().manual_seed(seed))
    if built is not None:
        _warn_one_batch(len(built.dataset), batch_size)
        if dist is None:
            return built
        _same_data_on_every_rank(train_data, dist, device or torch.device("cpu"))
        return _dist.shard_loader(built, dist, seed, batch_size=max(1, batch_size // dist.world_size))
    if isinstance(train_data, torch.utils.data.DataLoader):
        try:
            len(train_data)
        except TypeError:
            raise DataError(
                f"train_data: a DataLoader over {type(train_data.dataset).__name__}, which has no __len__; the pruning "
                "ramps, the LSQ start and the learning-rate schedule are placed on the run's steps, so the loader must "
                "say how many batches an epoch has: give the dataset a __len__ (its number of samples)"
            ) from None
        if dist is None:
            return train_data
        sharded = _dist.shard_loader(train_data, dist, seed)
        _same_batch_count(sharded, dist, device or torch.device("cpu"))
        return sharded
    several = (isinstance(train_data, (tuple, list)) and len(train_data) == 2 and isinstance(train_data[0], (tuple, list))
               and all(isinstance(t, torch.Tensor) for t in (*train_data[0], train_data[1])))
    if several:  # ((x1, x2), y): a model of several inputs
        raise DataError("train_data: ((x1, x2, ...), y) tensors of a model of several inputs: give a Dataset (or a "
                        "DataLoader over one) whose samples are ((x1, x2, ...), y): StackDataset(TensorDataset(x1, x2), y) "
                        "(torch.utils.data); each batch then calls model(x1, x2, ...)")
    raise DataError(f"train_data: {_what_was_given(train_data)}; pass a DataLoader or a Dataset yielding (x, y[, index]) "
                    "or dicts of tensors (input_ids, attention_mask, labels, as a Hugging Face dataset's collator makes "
                    "them), or a tuple (x, y) of tensors (numpy arrays: torch.from_numpy(x).float(), torch.from_numpy(y))"
                    + _as_batches_hint(train_data))


def _what_was_given(train_data) -> str:
    """train_data's type, and for a list or tuple the type of its items (a list of dict batches was told only of
    tuples and numpy arrays)."""
    if isinstance(train_data, (list, tuple)) and train_data:
        kinds = sorted({type(item).__name__ for item in train_data})
        return f"a {type(train_data).__name__} of {len(train_data):,} {' / '.join(kinds)} items"
    return f"a {type(train_data).__name__}"


def _as_batches_hint(train_data) -> str:
    """For a list of ready-made batches (dicts or tuples of tensors), the one line that makes them a loader."""
    if isinstance(train_data, (list, tuple)) and train_data and all(isinstance(b, (dict, tuple, list)) for b in train_data):
        return ("; a list of ready-made batches is a loader as torch.utils.data.DataLoader(batches, batch_size=None, "
                "shuffle=True), which yields each one as it is")
    return ""


def _warn_one_batch(samples: int, batch_size: int) -> None:
    """training.batch_size above the training samples: every epoch is one step of all of them (a recipe's
    100,000 on 1,348 images trained one step in all, without a word)."""
    if batch_size > samples:
        warnings.warn(f"training.batch_size {batch_size:,} is more than the {samples:,} training samples: each epoch is "
                      "one step of all of them, and the pruning ramps and schedules have that many steps to move in; "
                      "a batch_size of a tenth of the samples or less gives each epoch ten steps or more", stacklevel=4)


def first_inputs(loader):
    """The first two rows of the first batch's inputs: a tensor, a dict for dict batches, or a
    tuple for a model of several positional inputs (batches `((x1, x2), y)`: model(x1, x2))."""
    first = next(iter(loader), None)
    if first is None:
        raise DataError("train_data yields no batches (an empty data set, or drop_last with fewer samples than a "
                        "batch); give at least one batch of training data")
    x = split_batch(first).inputs
    several = isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x)
    if not isinstance(x, (torch.Tensor, dict)) and not several:
        raise DataError("train_data: batches must start with the inputs: a tensor, a tuple of tensors (a model of several "
                        f"inputs: ((x1, x2), y) calls model(x1, x2)) or be dicts of tensors; got {describe(x)}")
    return first_rows(tuple(x) if several else x)


def check_targets(model: nn.Module, recipe: Recipe, hint: bool = True) -> None:
    """Every technique with `targets`/`exclude` must select at least one layer, and none it
    cannot compress correctly (see check_layers). Packed attention projections and recurrent weights,
    which no technique can select, are named in a warning with the conversions that make them
    compressible (`hint`: False where the same model was checked and warned about already)."""
    from .conversions import conversion_hint
    from .session.checks import attached_layers
    from .techniques.base import selected_layers

    attached = attached_layers(model)
    if attached:
        shown = ", ".join(f"'{n}'" for n in attached[:3]) + (f" and {len(attached) - 3} more" if len(attached) > 3 else "")
        raise RecipeError(
            f"the model already carries jointcompress masks or quantizers ({shown}): it was given to compress() or "
            "prepare() before and not finalized, and a second run would stack another mask and quantizer on each "
            "weight. Compress a fresh copy of the original model (also to resume an interrupted run: resume=True "
            "loads the run's checkpoint into it), or finalize(model, example_inputs) first to compress the "
            "compressed model further"
        )
    said = conversion_hint(model) if hint else ""
    if said and any(hasattr(cfg, "targets") for cfg in recipe.techniques):
        warnings.warn(said[2:], stacklevel=3)

    refuse_tied_weights(model, recipe)
    claimed: dict[tuple[str, str], int] = {}  # (technique kind, layer) -> the entry that selects it
    for i, cfg in enumerate(recipe.techniques):
        if not hasattr(cfg, "targets"):
            continue
        check_layers(model, cfg, i)
        _warn_unmatched_patterns(model, cfg, i)
        selected = selected_layers(model, cfg)
        _check_claimed_once(claimed, cfg.type, list(selected), i)
        if selected:
            continue
        layers = [n for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE)]
        shown = ", ".join(layers[:12]) + (f", ... ({len(layers)} in all)" if len(layers) > 12 else "")
        raise RecipeError(
            f"techniques[{i}] ({cfg.type}): targets {cfg.targets} with exclude {cfg.exclude} select no layer of the model; "
            f"its Linear and convolution layers are: {shown or '(none)'}. Fix the glob patterns or remove the technique"
        )


def _warn_unmatched_patterns(model: nn.Module, cfg, i: int) -> None:
    """An `exclude` glob that matches no module name: a typo ('fc_2' for 'fc2') compressed the layer it was
    meant to keep out, without a word (misspelled layer_sparsity / layer_bits keys are refused by
    _check_named_layers). `targets` is left alone: several patterns are read as one per model family (the
    shipped hf recipe names BERT's and DistilBERT's layers), and a lone one that matches nothing selects no
    layer, which check_targets refuses."""
    from .graph import matches

    names = [n for n, _ in model.named_modules() if n]
    for pattern in cfg.exclude:
        if not any(matches(n, [pattern]) for n in names):
            warnings.warn(f"techniques[{i}] ({cfg.type}): exclude pattern {pattern!r} matches no module of the model, "
                          f"so the layers it was meant to keep out are compressed. Patterns are globs on full module "
                          f"names, such as {names[-1]!r} (`jointcompress dry-run` lists them)", stacklevel=4)


def refuse_tied_weights(model: nn.Module, recipe) -> None:
    """Layers whose weight is one Parameter with another module's (an embedding tied to its output layer, a
    layer reused by assignment): finalize bakes the compressed weight into that Parameter, changing the other
    module too. Said once for every technique that selects one: refused a technique at a time, a user who
    added the layer to one exclude met the same refusal from the next technique."""
    from .session.checks import tied_both_ways
    from .techniques.base import selected_layers

    tied = tied_both_ways(model)
    found: dict[str, None] = {}  # the tied layers some technique selects, in the order met
    techniques = []  # those techniques, as a refusal names them
    for i, cfg in enumerate(recipe.techniques):
        if tied and hasattr(cfg, "targets"):
            names = [n for n in selected_layers(model, cfg) if n in tied]
            found.update(dict.fromkeys(names))
            techniques += [f"techniques[{i}] ({cfg.type})"] if names else []
    if found:
        name, every = next(iter(found)), techniques
        raise RecipeError(
            f"layer '{name}' shares its weight with '{tied[name]}' (one Parameter in two places, e.g. an embedding "
            f"tied to its output layer); compressing it would change '{tied[name]}' too when finalize bakes the "
            f"weight. Add {' and '.join(repr(n) for n in found)} to exclude in {' and '.join(every)}")


def _refuse_shared_biases(model: nn.Module, selected: dict, where: str) -> None:
    """A bias shared by two layers (`b.bias = a.bias`): the techniques mask and round a compressed
    layer's bias, and finalize writes that into the one Parameter, so the other layer changes too
    (a probe: logits moved by 0.2 of their scale, 16% of predictions flipped, without a word)."""
    from .session.checks import tied_both_ways

    tied = tied_both_ways(model, "bias")
    for name in selected:
        if name in tied:
            other = tied[name]
            raise RecipeError(
                f"{where}: layer '{name}' shares its bias with '{other}' (one Parameter in two places); compressing "
                f"'{name}' lets the techniques mask (structured pruning) or round (quant_lsq) that bias, and finalize would "
                f"write it into '{other}' too. Give each "
                f"layer its own bias (e.g. `model.{name}.bias = nn.Parameter(model.{name}.bias.detach().clone())`) "
                f"or add both layers to exclude"
            )


def check_layers(model: nn.Module, cfg, i: int) -> None:
    """Layers a technique would select but cannot compress correctly (a weight tied to another module:
    refuse_tied_weights, for every technique at once), transformers' Conv1D (GPT-2; not a Linear), a weight
    another library parametrizes or that is not float32 (session.checks.weight_problem)."""
    from .graph import matches
    from .session.checks import is_conv1d, weight_problem
    from .techniques.base import selected_layers

    where = f"techniques[{i}] ({cfg.type})"
    selected = selected_layers(model, cfg)
    for name, layer in selected.items():
        problem = weight_problem(layer)
        if problem is not None:
            raise UnsupportedModelError(f"{where}: layer '{name}' cannot be compressed as it is: {problem}")
    _refuse_shared_biases(model, selected, where)
    _check_named_layers(cfg, selected, where)
    conv1d = [n for n, m in model.named_modules() if is_conv1d(m) and matches(n, cfg.targets) and not matches(n, cfg.exclude)]
    if conv1d:
        raise RecipeError(
            f"{where}: '{conv1d[0]}' is a transformers Conv1D (GPT-2 style), which the techniques do not act on; "
            "convert the model first with jointcompress.hf.causal.conv1d_to_linear(model) (exact), or exclude it"
        )


def _check_claimed_once(claimed: dict, kind: str, names: list[str], i: int) -> None:
    """Two entries of one kind (prune_unstructured twice, for other layers each) must not select the same
    layer: both masks stacked on it, and the layer ended at the stricter of the two, without a word."""
    for name in names:
        first = claimed.setdefault((kind, name), i)
        if first != i:
            raise RecipeError(f"techniques[{first}] and techniques[{i}] ({kind}) both select layer '{name}'; give each "
                              "entry its own layers (targets / exclude), or use one entry")


def _check_named_layers(cfg, selected: dict, where: str) -> None:
    """Per-layer settings (prune_unstructured.layer_sparsity, quant_lsq.layer_bits) must name layers the
    technique acts on: a typo (fc_1 for fc1) was ignored, and the layer ran at the default."""
    field = "layer_sparsity" if cfg.type == "prune_unstructured" else "layer_bits" if cfg.type == "quant_lsq" else None
    unknown = [name for name in (getattr(cfg, field, None) or {}) if name not in selected] if field else []
    if unknown:
        raise RecipeError(f"{where}: {field} names {', '.join(map(repr, unknown[:4]))}, not a layer it compresses; "
                          f"those are {', '.join(map(repr, list(selected)[:12]))}{', ...' if len(selected) > 12 else ''}")


def eval_outputs(model: nn.Module, inputs):
    """The model's outputs on `inputs` in eval mode without gradients, each module's mode restored after."""
    with evaluating(model), torch.no_grad():
        return call_model(model, inputs)


def _float_into_embedding(model: nn.Module, example, err: Exception) -> bool:
    """Float inputs refused by an embedding lookup (torch: "Expected tensor for argument #1 'indices' to have one
    of the following scalar types: Long, Int"): the ids need .long(), not the .float() the dtype hint gives."""
    tensors = example.values() if isinstance(example, dict) else example if isinstance(example, (tuple, list)) else [example]
    floats = any(isinstance(t, torch.Tensor) and torch.is_floating_point(t) for t in tensors)
    return floats and "indices" in str(err) and any(isinstance(m, nn.Embedding) for m in model.modules())


def check_data(model: nn.Module, example, train_data, what: str = "train_data"):
    """One forward pass on a real batch before training: wrong input shapes and labels outside
    the model's classes fail here, with the shapes named, instead of deep inside the loop.
    `what` names where the batch came from. Returns the model's outputs on the batch."""
    try:
        out = eval_outputs(model, example)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        hint = "give inputs of the shape the model expects"
        if any(word in str(err) for word in ("dtype", "scalar type", "Input type (")):  # matmul, index, conv
            hint = ("give inputs of the dtype the model's weights have: x.float() for float64 ones (numpy's default), "
                    "x.float() / 255 for uint8 images")
            if _float_into_embedding(model, example, err):
                hint = ("the model has an embedding, which takes integer ids: give token ids as x.long() "
                        "(a float tensor of ids came from a float array or a collate that cast them)")
            weights = {p.dtype for p in model.parameters() if p.is_floating_point()}
            if weights and torch.float32 not in weights:  # the model's, not the data's: fp16 / bf16 / fp64 weights
                raise UnsupportedModelError(
                    f"the model's weights are {', '.join(sorted(str(d) for d in weights))} ({type(err).__name__} on a "
                    f"batch of {describe(example)}), and the techniques train float32 weights (their step sizes, masks "
                    "and estimates are float32); call model.float() (and teacher.float()) before compressing, or return "
                    "it from your builder: the artifact stores the low-bit weights either way") from None
        if isinstance(example, dict) and any(f"'{k}'" in str(err) for k in LABEL_KEYS if k in example):
            hint = ("dict batches pass every key to the model, the labels too (as Hugging Face models expect): let "
                    "forward take labels=None, or yield ((x1, x2, ...), labels) tuples, which call model(x1, x2, ...)")
        raise DataError(
            f"{what}: the model cannot run on a batch of shape {describe(example)} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); {hint}"
        ) from None
    if isinstance(train_data, (tuple, list)) and len(train_data) == 2 and isinstance(out, torch.Tensor) and out.dim() == 2:
        y = train_data[1]
        if y.numel() and not torch.is_floating_point(y) and (int(y.min()) < 0 or int(y.max()) >= out.shape[1]):
            raise DataError(
                f"train_data: labels range over [{int(y.min())}, {int(y.max())}] but the model has {out.shape[1]} outputs; "
                f"labels must be class indices in [0, {out.shape[1] - 1}]"
            )
    return out


def teacher_cannot_run(example, err: Exception) -> DataError:
    """The one message for a teacher that cannot take the model's inputs, with the ways out."""
    return DataError(
        f"teacher: it cannot run on the model's inputs {describe(example)} ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:200] if str(err) else ''}); the teacher takes the same inputs as the model: the "
        "same input size, weights of the inputs' dtype (a bf16 or fp16 teacher: teacher.float()) and on the model's "
        "device (teacher.to(device))")


def warn_teacher_unused(model: nn.Module, teacher: nn.Module | None, recipe) -> None:
    """A teacher given where the recipe has no distill_kd is not used: a forgotten distill_kd meant no distillation,
    without a word. Not said where the teacher is the model's own starting point (the command line passes the
    trained model as the teacher of every run, distilled or not)."""
    if teacher is None or recipe.technique("distill_kd") is not None:
        return
    from .checkpoint import state_digest

    with contextlib.suppress(Exception):  # hashed only where the shapes match; a state read otherwise: another model
        mine, theirs = model.state_dict(), teacher.state_dict()
        alike = mine.keys() == theirs.keys() and all(mine[k].shape == theirs[k].shape for k in mine)
        if alike and state_digest(mine) == state_digest(theirs):
            return
    warnings.warn("teacher: given, but the recipe has no distill_kd, so nothing is distilled from it; add "
                  "{type: distill_kd} to the recipe's techniques to distil, or leave teacher out", stacklevel=4)


def check_teacher_data(teacher: nn.Module, example, model_outputs, alpha: float) -> None:
    """The teacher runs once on a real batch before training, beside the model's `model_outputs`
    on it: a teacher that cannot take the model's inputs (another dtype, another input size) or
    gives logits of another shape (other classes) fails here, named, instead of inside the first
    step's distillation."""
    from .session.outputs import Batch, logits_of
    from .techniques.distill_kd import check_teacher_logits

    try:
        t_logits = logits_of(eval_outputs(teacher, Batch(example).teacher_inputs), whose="teacher")
    except TEACHER_INPUT_ERRORS as err:
        raise teacher_cannot_run(example, err) from None
    s_logits = logits_of(model_outputs)
    if t_logits.device != s_logits.device:  # its inputs followed it there; distillation would fail at the first step
        raise DataError(f"teacher: it is on {t_logits.device} and the model on {s_logits.device}; distillation compares "
                        "their logits on every step, so put the teacher beside the model (teacher.to(device))")
    if not bool(torch.isfinite(t_logits).all()):  # every step's distill term would be NaN, rolled back and retried
        from .session.checks import nonfinite_tensors

        bad = nonfinite_tensors(teacher.named_parameters())
        where = (f"its parameters {', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''} hold NaN or inf" if bad else
                 "its parameters are finite: its forward overflows on these inputs, or a buffer (BatchNorm's running "
                 "statistics) holds NaN")
        raise DataError(f"teacher: its logits on the first batch hold NaN or inf ({where}); distillation would train "
                        "the model toward them. Load the teacher's weights again (or the checkpoint before it diverged)")
    if alpha > 0:
        check_teacher_logits(s_logits, t_logits)
        _warn_probabilities(t_logits)


def _warn_probabilities(t_logits: torch.Tensor) -> None:
    """A teacher that ends in a softmax gives probabilities, which distillation reads as logits: softmax(p / T) of
    values in [0, 1] is nearly uniform, so the student learned almost nothing from it (the term halved), unsaid."""
    rows = t_logits.float().flatten(0, -2) if t_logits.dim() > 1 else t_logits.float()[None]
    ones = torch.ones_like(rows[:, 0])
    if rows.shape[-1] > 1 and bool((rows >= 0).all()) and torch.allclose(rows.sum(-1), ones, atol=1e-3):
        warnings.warn("teacher: its outputs are probabilities (each row is non-negative and sums to 1), and distill_kd "
                      "takes logits: softmax(probabilities / T) is nearly uniform, so little of the teacher is "
                      "distilled. Give the teacher without its final softmax (its log_softmax works too)",
                      stacklevel=4)


def compress(
    model: nn.Module,
    recipe: Recipe | dict,
    train_data,
    evaluate: Callable[[nn.Module], dict[str, float] | float],
    teacher: nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
    callbacks: list | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    max_nonfinite: int = 3,
    distributed: Any = "auto",
    loss_fn: Callable | None = None,
) -> Result:
    """Compress `model` in place with `recipe` (joint, overlap or sequential); returns a Result.

    `mode: joint` with a size target (size_kb / ratio) and no size_budget trains the recipe's joint
    form (joint_form.py: zero as a quantizer level under one size budget; `Result.recipe` is what
    ran, and history records a `joint_form` event); overlap and sequential meet a size target
    through the allocator's per-layer budgets.

    `evaluate(model)` returns the user's metric(s) on held-out data; it is called after
    every epoch, with the model in eval mode (each module's mode put back after), and the best
    state with all techniques at their target is kept.

    Reliability (docs/reliability.md): with `run_dir` a checkpoint is written to
    RUN_DIR/checkpoints every `checkpoint_every` steps and after every evaluation, and
    `resume=True` continues from the newest complete one (a fresh start if there is none);
    an existing checkpoint is never overwritten by a new run (pass resume=True or another
    run_dir). A non-finite loss or gradient skips the step and rolls back with half the LR;
    the `max_nonfinite`-th one raises TrainingError. Under torchrun (`distributed="auto"`)
    or an initialized process group the run is data-parallel; `distributed=False` forces a
    single process.

    Batches may be (x, y[, index]) tuples or dicts (HF style: the model is called with
    **batch); outputs any tensor, tuple, dict or ModelOutput (the logits are read from it).
    `loss_fn(outputs, batch)` replaces the default task loss (the model's own loss, else
    cross-entropy on the logits). `progress(step, total)` is called after every optimizer step
    (compress() prints nothing itself; the command line draws its bar from it).
    """
    recipe = parse_recipe(recipe)
    _check_run_arguments(recipe, teacher, run_dir, resume)
    warn_validation_unread(recipe)
    warn_unread_quant_start(recipe)
    warn_no_steps_after(recipe)
    warn_compresses_nothing(recipe)
    if not callable(evaluate):  # else a TypeError after the first epoch's training
        raise RecipeError(f"evaluate is {type(evaluate).__name__}, not a function: pass one that takes the model and "
                          "returns its metric on held-out data, e.g. jointcompress.data.evaluator(x_test, y_test); "
                          "compress() keeps the best state it measures")
    _check_argument_types(model, teacher, progress, callbacks, loss_fn)
    dist = _dist.resolve(distributed)
    with run_lock(run_dir, dist):  # another run in run_dir is refused, naming it
        return _compress(model, recipe, train_data, evaluate, teacher, progress, callbacks, run_dir=run_dir,
                         resume=resume, checkpoint_every=checkpoint_every, max_nonfinite=max_nonfinite, dist=dist,
                         loss_fn=loss_fn)


# True inside validation_held_out(): the caller held training.validation_images out and built `evaluate` on them
_HELD_OUT = contextvars.ContextVar("jointcompress_validation_held_out", default=False)


@contextlib.contextmanager
def validation_held_out():
    """compress() calls made inside come from a caller that held training.validation_images out of its data and
    evaluates on them (pipeline.compress_and_save, the hf recipe), so compress() does not say it reads none."""
    token = _HELD_OUT.set(True)
    try:
        yield
    finally:
        _HELD_OUT.reset(token)


def warn_validation_unread(recipe: Recipe, reader: str = "compress()") -> None:
    """compress() trains on the data it is given and keeps the epoch the given `evaluate` rates best, and
    prepare() leaves data and evaluation to the caller's loop: a recipe's training.validation_images, which
    the command line reads, held nothing out there, without a word."""
    held = recipe.training.validation_images
    if not held or _HELD_OUT.get():
        return
    fix = (f"hold the images out yourself (split = jointcompress.data.hold_out(split, {held}); train on split.x_train, "
           "split.y_train")
    if reader == "compress()":
        does = "compress(), which trains on the train_data given and keeps the epoch your `evaluate` rates best"
        fix += " and pass jointcompress.data.evaluator(*split.selection()))"
    else:
        does = f"{reader}: your loop chooses its data and what it evaluates on"
        fix += " and evaluate on split.selection())"
    warnings.warn(f"training.validation_images: {held} is not read by {does}; {fix}, or set it to 0. The command line, "
                  "compare and demo hold them out for you", stacklevel=3)


def _compress(model: nn.Module, recipe: Recipe, train_data, evaluate, teacher, progress, callbacks, *, run_dir, resume,
              checkpoint_every, max_nonfinite, dist, loss_fn) -> Result:
    """compress() once its arguments passed their checks and its run folder is locked."""
    from .session.outputs import new_run

    new_run()  # the warnings said once a run are said again, once
    model = _dist.unwrap(model)
    teacher = _dist.unwrap(teacher) if teacher is not None else None
    same_recipe_on_every_rank(recipe, dist, model_device(model))
    same_teacher_on_every_rank(teacher, dist, model_device(model))
    loader, example = _checked_inputs(model, teacher, recipe, train_data, dist)
    sample = getattr(evaluate, EVALUATOR_SAMPLE, None)  # data.evaluator's: its images meet the model now
    if isinstance(sample, torch.Tensor):  # a Mock or proxy answers any name with something else
        check_data(model, sample, None, what="evaluation data")
    callbacks = list(callbacks or [])
    given = recipe
    recipe, joint_form = as_joint_form(recipe)  # mode: joint under a size target: one decision, one budget
    asked = recipe
    recipe = _resolve_target(model, recipe, example, callbacks, run_dir, resume, dist, evaluate, loader)
    goal = _allocated_size_goal(model, recipe)
    techniques = [tech.build(c) for c in recipe.techniques]
    plan = make_plan(techniques, recipe.training.epochs * len(loader), recipe)
    trainer = Trainer(
        model, techniques, plan, recipe, loader, evaluate, example, teacher=teacher, progress=progress, callbacks=callbacks,
        run_dir=run_dir, checkpoint_every=checkpoint_every, resume=resume, max_nonfinite=max_nonfinite, dist=dist,
        loss_fn=loss_fn, asked_recipe=asked if asked is not recipe else None,
    )
    if run_dir is not None:  # recorded in the checkpoints; a resume with other data or another teacher is refused
        trainer.checkpoints.inputs = run_inputs(train_data, teacher)
        trainer.checkpoints.given_recipe = given  # a resume's refusal names what the user changed in it
    if joint_form is not None:
        trainer.history.events.append(joint_form)
    if recipe._resolution is not None:  # a resumed run's history is replaced by its checkpoint's, which has it
        trainer.history.events.append(recipe._resolution)
    try:
        history = trainer.run()
    except BaseException:  # the user's teacher leaves with its own mode and no capture hooks, whatever stopped the run
        trainer.session.release_hooks()
        raise
    metrics = _kept_epochs_metrics(history)
    if metrics is None:  # no epoch kept (none at the target): the model as the run left it, evaluated now
        metrics = evaluated(evaluate, model, recipe.training.metric)
        if dist is not None:
            metrics = dist.mean_metrics(metrics)
    trainer.session.finish()
    _warn_size_missed(model, example, goal)
    return Result(model, history, dict(metrics), recipe, techniques, example, target=asked.target)


def _kept_epochs_metrics(history) -> dict | None:
    """The metrics the kept epoch was read at (its state is the one the run ends with), or None where no epoch
    was kept. Evaluating the model again after the run cost one more evaluation, and an evaluate that draws (a
    random subset) returned other numbers than those the epoch was chosen on."""
    if history.best_epoch is None:
        return None
    return next((dict(e["metrics"]) for e in history.epochs if e.get("epoch") == history.best_epoch), None)


def _allocated_size_goal(model: nn.Module, recipe: Recipe) -> float | None:
    """The weights file's bytes a size target asks for where the allocator's budgets (and the steering) are
    to meet it (mode: sequential / overlap), measured on the model before it trains; None otherwise (the
    joint form's size budget checks its own file, and save warns where it is over)."""
    from .targets import target_bytes

    target = recipe.target
    if target is None or target.is_latency or recipe.technique("size_budget") is not None:
        return None
    return target_bytes(model, target)


UNDER_TARGET_WARNING = 0.10  # a file this share under its size target is said: bytes the run could have spent


def _warn_size_missed(model: nn.Module, example, goal: float | None) -> None:
    """Say it where the file the run ends with is over its size target (a run too short to steer, or steering
    turned off, ended over it without a word until the user measured the saved file), or far under it (a loose
    target that fixed bit-widths fill dense, or low-bit weights rounding to zero: accuracy left unbought)."""
    if goal is None:
        return
    from .techniques.size_estimate import measured_bytes

    size = measured_bytes(model, example)["total"]
    if size > goal:
        warnings.warn(f"size target missed: the weights file would be {size:,} B, {size / goal - 1:.1%} over the "
                      f"target's {goal:,.0f} B; train longer (the steering re-fits at 80% of the pruning ramp and trims "
                      "at 90% of the run), keep target.steer on, or ask for a lower ratio", stacklevel=3)
    elif size < goal * (1 - UNDER_TARGET_WARNING):
        warnings.warn(f"size target: the weights file would be {size:,} B, {1 - size / goal:.1%} under the target's "
                      f"{goal:,.0f} B, bytes the run did not spend; more bits per weight (quant_lsq.bits, or learned "
                      "widths in mode: joint) or more epochs may spend them on accuracy, and a comparison with another "
                      "run at this target compares files of other sizes", stacklevel=3)


def _checked_inputs(model: nn.Module, teacher: nn.Module | None, recipe: Recipe, train_data, dist):
    """(loader, example inputs) once the model, the teacher, the targets and the data passed their checks:
    whatever would fail later, deep inside training, fails here with a message that names the fix."""
    refuse_scripted(model)
    check_teacher(model, teacher)
    check_model_tensors(model)
    extra = non_tensor_state(model)
    if extra is not None:  # the first snapshot's clone failed on it ("'dict' object has no attribute 'detach'")
        raise RecipeError(non_tensor_message(*extra, "the built-in loop's snapshots and checkpoints hold tensors only "
                                                     "(nothing is pickled; a loop of your own with prepare() carries it)"))
    check_dense_gradients(model)
    check_targets(model, recipe)
    seed_everything(recipe.training.seed)
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    loader = as_loader(train_data, recipe.training.batch_size, recipe.training.seed, dist, batch_norm=batch_norm,
                       device=model_device(model))
    if dist is None:  # under torchrun a loader's batch is each rank's share of training.batch_size
        _warn_loader_batch_size(train_data, recipe)
    example = first_inputs(loader)
    outputs = check_data(model, example, train_data)
    if teacher is not None and recipe.technique("distill_kd") is not None:
        check_teacher_data(teacher, example, outputs, recipe.technique("distill_kd").alpha)
    warn_teacher_unused(model, teacher, recipe)
    from .targets import warn_unused_sparsity

    warn_unused_sparsity(recipe)
    return loader, example


def _allocation_scan(model: nn.Module, recipe: Recipe, example, evaluate, loader, run_dir, resume: bool, dist):
    """target.allocator: sensitivity's scan of the model (targets.allocation_scan), None for erk, for a size target
    no allocator reads, or for a resumed run (its checkpoint holds the budgets). Every rank reads every setting
    under torchrun, each reading averaged over the ranks (each rank's evaluate may see its share of the data)."""
    from .run_target import resumed_resolution
    from .targets import allocation_scan

    target = recipe.target
    if target.allocator != "sensitivity" or target.is_latency or target.allocated or recipe.technique("size_budget"):
        return None
    if resume and resumed_resolution(recipe, run_dir) is not None:
        return None
    batches = _norm_batches(model, loader, recipe.training.recalibrate_norms)
    return allocation_scan(model, recipe, example, evaluate if dist is None else _averaged(evaluate, dist), batches)


def _averaged(evaluate, dist):
    """`evaluate` read on every rank and averaged (a dict of metrics, or one number)."""
    def averaged(model):
        out = evaluate(model)
        if isinstance(out, dict):
            return dist.mean_metrics({k: float(v) for k, v in out.items()})
        return dist.mean_metrics({"value": float(out)})["value"]
    return averaged


def _norm_batches(model: nn.Module, loader, count: int) -> list | None:
    """The inputs of the loader's first `count` batches, for a sensitivity scan of a model with BatchNorm to
    re-estimate its statistics before each reading (sensitivity.scan); None without BatchNorm or tensor inputs."""
    import itertools

    from .session.norm_statistics import trained_norms

    if not count or loader is None or not trained_norms(model):
        return None
    batches = []
    for batch in itertools.islice(loader, count):
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(inputs, torch.Tensor):
            return None
        batches.append(inputs)
    return batches


def _warn_loader_batch_size(train_data, recipe: Recipe) -> None:
    """A DataLoader of the caller's batches as it was made: a recipe that sets training.batch_size too was
    overridden without a word."""
    given = getattr(train_data, "batch_size", None) if isinstance(train_data, torch.utils.data.DataLoader) else None
    if given is not None and "batch_size" in recipe.training.model_fields_set and given != recipe.training.batch_size:
        warnings.warn(f"training.batch_size: {recipe.training.batch_size}, but the DataLoader given makes batches of "
                      f"{given}, which the run trains on; pass the tensors or the Dataset for the recipe's batches, or "
                      "drop training.batch_size from the recipe", UserWarning, stacklevel=4)


def _resolve_target(model: nn.Module, recipe: Recipe, example, callbacks: list, run_dir, resume: bool, dist,
                    evaluate=None, loader=None) -> Recipe:
    """The recipe with its size / ratio / latency target turned into per-layer sparsity and bits (unchanged
    without a target); a steered size target adds its SizeSteering callback to `callbacks`. `evaluate` and
    the `loader`'s first batches (BatchNorm statistics) feed target.allocator: sensitivity's scan."""
    if recipe.target is None:
        return recipe
    from .run_target import resolve_for_run
    from .targets import SizeSteering, target_bytes

    scanned = _allocation_scan(model, recipe, example, evaluate, loader, run_dir, resume, dist)
    recipe = resolve_for_run(model, recipe, example, run_dir, resume, dist, sensitivity=scanned)
    if recipe.target is not None and recipe.target.steer and not recipe.target.is_latency:
        callbacks.append(SizeSteering(target_bytes(model, recipe.target),
                                      refit_on_rounding=recipe.target.refit_on_rounding))
    return recipe


def run_inputs(train_data, teacher) -> dict:
    """What a run's checkpoints record of its inputs: the sha256 of training data held as tensors in memory (an
    (x, y) pair, or a DataLoader over a TensorDataset; other data is not read whole to hash it: not recorded, not
    checked) and of the teacher's state."""
    from .checkpoint import data_digest, data_tensors, state_digest

    found = {}
    digest = data_digest(train_data)
    if digest is not None:
        tensors = data_tensors(train_data)
        names = "xy" if len(tensors) == 2 and not isinstance(train_data, torch.utils.data.DataLoader) else \
            [f"tensor {i}" for i in range(len(tensors))]
        found["data_sha256"] = digest
        found["data_shape"] = ", ".join(f"{n} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                                        for n, t in zip(names, tensors))
    if teacher is not None:
        found["teacher_sha256"] = state_digest(teacher)
    return found


def _warn_uneven_batch(batch_size: int, world_size: int) -> None:
    """training.batch_size is the global batch, each of `world_size` ranks taking batch_size // world_size:
    one that does not divide changed the global batch without a word (64 over 3 ranks trained at 63)."""
    if batch_size % world_size:
        each = max(1, batch_size // world_size)
        warnings.warn(f"training.batch_size {batch_size} is not a multiple of the {world_size} processes: each takes "
                      f"{each}, a global batch of {each * world_size}; give a multiple of {world_size} for the batch "
                      "the recipe asks", stacklevel=4)


def _check_argument_types(model, teacher, progress, callbacks, loss_fn) -> None:
    """compress()'s other arguments, named when they are of the wrong kind (each failed deep inside:
    'str' has no attribute 'named_parameters', 'int' object is not callable at the first step)."""
    for name, value in (("model", model), ("teacher", teacher)):
        if value is not None and not isinstance(value, nn.Module):
            raise RecipeError(f"{name} is {type(value).__name__}, not a torch.nn.Module: pass the model itself "
                              f"(a path or a state dict is loaded into the model first)")
    for name, value in (("progress", progress), ("loss_fn", loss_fn)):
        if value is not None and not callable(value):
            raise RecipeError(f"{name} is {type(value).__name__}, not a function; pass a callable or None")
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        raise RecipeError(f"callbacks is {type(callbacks).__name__}; pass a list of callback objects (or None)")
    for callback in callbacks or ():
        _check_callback(callback)


# the hooks the built-in loop calls on a callback (training/loop.Trainer) and the arguments each is given
CALLBACK_HOOKS = {"on_start": ("trainer", "step"), "on_step": ("trainer", "step", "out"),
                  "on_epoch": ("trainer", "entry"), "on_end": ("trainer",)}


def _check_callback(callback) -> None:
    """A callback holds at least one hook, each taking the arguments the loop gives: a plain function was
    ignored without a word, and a hook of another signature failed with a TypeError after training began."""
    import inspect

    hooks = {name: getattr(callback, name) for name in CALLBACK_HOOKS if callable(getattr(callback, name, None))}
    shown = ", ".join(f"{name}({', '.join(args)})" for name, args in CALLBACK_HOOKS.items())
    if not hooks:
        raise RecipeError(f"callbacks: {callback!r} has none of the hooks the loop calls; give an object with any of "
                          f"{shown} (a function alone is not called)")
    for name, hook in hooks.items():
        try:
            inspect.signature(hook).bind(*CALLBACK_HOOKS[name])
        except TypeError:
            raise RecipeError(f"callbacks: {type(callback).__name__}.{name}{inspect.signature(hook)} cannot take the "
                              f"arguments the loop gives it: {name}({', '.join(CALLBACK_HOOKS[name])})") from None
        except ValueError:  # a builtin without a signature: called as it is
            continue


def _check_run_arguments(recipe: Recipe, teacher, run_dir, resume: bool) -> None:
    """Refuse, before any work, a call that cannot run as asked or would overwrite another run's checkpoints."""
    if run_dir is not None and Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise RecipeError(f"run_dir {run_dir} is a file, not a directory; pass a directory for the run's checkpoints")
    if recipe.technique("distill_kd") is not None and teacher is None:
        raise RecipeError("techniques: distill_kd needs a teacher; pass teacher=... (the uncompressed model to distil from) or remove distill_kd")
    if run_dir is None and resume:
        raise RecipeError("resume=True needs run_dir=... (the directory whose checkpoints to continue from)")
    if run_dir is not None and not resume:
        from .checkpoint import CheckpointStore

        if CheckpointStore(run_dir).paths():
            raise RecipeError(
                f"{run_dir} already holds checkpoints of a run; pass resume=True (CLI: --resume) to continue it, "
                "or choose another run directory"
            )


def check_dense_gradients(model: nn.Module) -> None:
    """The built-in loop trains with Adam, which takes no sparse gradient: an nn.Embedding(sparse=True)
    failed mid-training inside torch (the gradient check's norm, or Adam itself)."""
    sparse = [name for name, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    if sparse:
        raise UnsupportedModelError(
            f"{', '.join(sparse[:4])}: an embedding with sparse=True gives sparse gradients, which the built-in "
            "loop's Adam does not take; set sparse=False on it for compress(), or drive the session in your own "
            "loop (jointcompress.prepare) with torch.optim.SparseAdam for that table")


def train_baseline(model: nn.Module, train_data, evaluate, epochs: int = 10, lr: float = 1e-3, batch_size: int = 128, seed: int = 0, progress=None) -> History:
    """Plain training (no technique): trains the teacher / the uncompressed reference. Its BatchNorm
    layers evaluate with the running averages training left (recalibrate_norms 0): no grid or mask moves
    the weights faster than they follow, and every stored teacher trained so."""
    import warnings

    from .recipe import CompressesNothing

    recipe = parse_recipe({"training": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                                        "recalibrate_norms": 0}})
    with warnings.catch_warnings():  # no technique on purpose: the reference trains, nothing is compressed
        warnings.simplefilter("ignore", CompressesNothing)
        return compress(model, recipe, train_data, evaluate, progress=progress).history

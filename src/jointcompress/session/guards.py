"""Misuse of a session from the caller's loop, refused by name instead of running silently.

Each of these once ran without a word and left a model that was not what the loop meant: a
session stepped after finalize (zeros regrew, weights left the low-bit grid), outputs computed
under torch.no_grad() (nothing trained), a checkpoint resumed into a session prepared with
another recipe or total_steps (another schedule, or torch's raw missing/unexpected keys).
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping

import torch

from ..errors import RecipeError, TrainingError
from ..recipe import with_added_fields, without_memory_fields


def refuse_finalized(verb: str, step: int) -> None:
    """A verb of the training loop after finalize(): the masks and quantizers are gone, so another
    optimizer step trains dense fp32 weights that no longer match the spec finalize returned."""
    raise TrainingError(
        f"session.{verb}() after session.finalize(): the session was finalized at step {step} (masks applied, "
        "LSQ values baked, the techniques removed), and stepping on would train the finalized weights off their "
        "masks and low-bit grid. Finalize after the loop's last step; checkpoint with session.state_dict() before "
        "finalize, save the finalized model with artifact.save(model, spec, ...); to train again, prepare a new "
        "session: on a fresh copy of the original model, or on the finalized one to compress it further")


def check_terms_given(terms) -> None:
    """session.backward takes the dict session.loss returns (terms added to it are scalar tensors): one
    loss tensor failed in torch's sparse Tensor.values() ("values expected sparse tensor layout"), a
    Python number in the coordinator ("'float' object has no attribute 'requires_grad'")."""
    if not isinstance(terms, Mapping):
        raise TrainingError(f"session.backward takes the dict of named terms session.loss returns, not "
                            f"{type(terms).__name__}: terms = session.loss(outputs, batch) (your own loss as "
                            "session.loss(outputs, batch, task_loss=loss)); session.backward(terms)")
    wrong = {name: t for name, t in terms.items() if not isinstance(t, torch.Tensor) or t.numel() != 1}
    if wrong:
        from .outputs import described

        name, t = next(iter(wrong.items()))
        raise TrainingError(f"session.backward: the term '{name}' is {described(t)}; every term is a scalar tensor with its "
                            "graph (reduce a per-sample loss with .mean(); not .item(), which has no gradient)")


def check_terms_have_grad(terms: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> None:
    """No term requires grad: a plain loss.backward() raises here too; the coordinator would skip the
    backward and the step would train nothing, silently. A model whose every parameter is frozen (and no
    technique yet training its own) is said as such: the no_grad advice sent its user looking for a context that
    was not there."""
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in terms.values()):
        return
    names = ", ".join(terms) or "none"
    if model is not None and not any(p.requires_grad for p in model.parameters()):
        raise TrainingError(
            f"none of the loss terms ({names}) requires grad, so nothing would train: every parameter of the model is "
            "frozen (requires_grad=False) and no technique trains parameters of its own yet (quant_lsq's step sizes "
            "from its start). Unfreeze the layers to compress (model.requires_grad_(True), or the ones you choose)")
    raise TrainingError(
        f"session.backward: none of the loss terms ({names}) requires grad, so nothing would train. The model's "
        "outputs were computed under torch.no_grad() / torch.inference_mode() (an evaluation helper reused for "
        "training?), or detached; compute the training step's outputs with gradients enabled")


def reaches_parameters(term: torch.Tensor, params) -> bool | None:
    """Whether `term`'s autograd graph reaches any of `params` (True / False), or None where the graph
    hides it: a reentrant activation checkpoint (transformers' gradient_checkpointing) recomputes its
    segment in its own backward. A walk over the graph's nodes: no backward runs."""
    from ..coordination import graph_nodes

    wanted, opaque = {id(p) for p in params}, False
    for node in graph_nodes(term):
        variable = getattr(node, "variable", None)  # an AccumulateGrad: a leaf's gradient lands there
        if variable is not None and id(variable) in wanted:
            return True
        opaque = opaque or node.name() == "CheckpointFunctionBackward"
    return None if opaque else False


def check_terms_reach_model(terms: dict[str, torch.Tensor], primary: tuple[str, ...], model: torch.nn.Module) -> None:
    """The accuracy terms (the task loss, distillation) depend on the model prepare() was given. A loss of
    another model (a copy of it, the teacher) left it untrained by them, while the size terms' gradients
    still reached it and pruned it: finalize then baked a compressed model trained on nothing but its size."""
    params = [p for p in model.parameters() if p.requires_grad]
    accuracy = {name: t for name, t in terms.items()
                if name in primary and isinstance(t, torch.Tensor) and t.requires_grad}
    if not params or not accuracy:
        return
    cut = [name for name, t in accuracy.items() if reaches_parameters(t, params) is False]
    if cut:
        raise TrainingError(
            f"session.backward: the loss terms {', '.join(cut)} do not depend on any weight of the model prepare() "
            "was given: they were computed with another model (a copy of it, or the teacher). Compute the outputs "
            "with session.model itself, the very model passed to prepare()")


def refuse_ddp_forward(module: torch.nn.Module, args) -> None:
    """A forward pre-hook on the prepared model: it refuses a call made through a DistributedDataParallel
    wrapper added after prepare() (prepare() refuses one it is given). The wrapper's reducer waits for
    gradients the session's per-term backward never hands it, so torch failed with advice on
    find_unused_parameters; with that flag set the run went on with every gradient averaged twice, once by
    the reducer and once by the session. Module-level, not a closure: a hook stays picklable."""
    active = getattr(torch.nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
    if active is not None and getattr(active, "module", None) is module:
        raise RecipeError(
            "the model prepare() was given is being called through DistributedDataParallel, wrapped after "
            "prepare(); call the model itself (model.module) in your loop: under torchrun the session averages "
            "the gradients after its coordinated backward, and DDP's reducer would wait for gradients it never "
            "gets, or average them a second time (docs/reliability.md)")


class NonFiniteWatch:
    """A non-finite loss term in the caller's own loop (NaN in an input, a learning rate too high): the
    optimizer writes it into the weights, and finalize and save once baked a NaN model without a word.
    compress()'s loop rolls such steps back itself. Here each step's terms are flagged where they are
    (no device sync), the flags read every `every` steps and at finalize, and the first bad one warned."""

    def __init__(self, every: int = 50):
        self.every = every
        self.flags: dict[str, torch.Tensor] = {}
        self.since = 0  # the first step the flags cover
        self.warned = False

    def note(self, terms: dict[str, torch.Tensor]) -> None:
        if self.warned:
            return
        for name, t in terms.items():
            if isinstance(t, torch.Tensor):
                finite = torch.isfinite(t.detach()).all()
                self.flags[name] = finite if name not in self.flags else self.flags[name] & finite

    def read(self, step: int, model: torch.nn.Module, force: bool = False) -> None:
        """Warn (once) if a term since the last read was not finite; at `force` (finalize) or every `every` steps."""
        if self.warned or not self.flags or not (force or step % self.every == 0):
            return
        bad = [name for name, flag in self.flags.items() if not bool(flag)]
        first, self.since, self.flags = self.since, step, {}
        if not bad:
            return
        self.warned = True
        from .checks import nonfinite_tensors

        broken = len(nonfinite_tensors(model.named_parameters()))
        effect = (f"{broken} of the model's parameters are now not finite" if broken else
                  "the parameters are still finite (a skipped step, e.g. by a GradScaler?)")
        warnings.warn(
            f"session: loss term(s) {', '.join(bad)} were not finite at a step between {first} and {step} (NaN or inf "
            f"in an input or a label, or a learning rate too high); {effect}. compress() rolls such steps back; in "
            "your own loop, skip optimizer.step() (and session.before_step / after_step) when torch.isfinite(loss) "
            "is false, or clean the data", RuntimeWarning, stacklevel=3)


class OptimizerOrderWatch:
    """optimizer.step() of a bound optimizer after session.after_step() instead of before it: after_step ends
    the step (the size budget's multiplier reads the step's size, the next step's masks and freezes are set
    from the weights), so all of it ran on the weights before the update, with no word. Said once, from a
    post-hook on the optimizer's step; a step GradScaler skips (no optimizer.step) says nothing. Its state
    loaded before the session's is refused by name (refuse_optimizer_state_first)."""

    def __init__(self):
        self.handle = self.loading = self.optimizer = None
        self.warned = False

    def watch(self, optimizer: torch.optim.Optimizer, session) -> None:
        if optimizer is self.optimizer:
            return
        self.remove()
        self.optimizer = optimizer
        inner = optimizer  # accelerate's AcceleratedOptimizer (the Trainer's) wraps the one that steps
        while not hasattr(inner, "_optimizer_step_post_hooks") and hasattr(inner, "optimizer"):
            inner = inner.optimizer
        if hasattr(inner, "_optimizer_step_post_hooks"):
            self.handle = inner.register_step_post_hook(lambda *_: self._stepped(session))
            self.loading = inner.register_load_state_dict_pre_hook(refuse_optimizer_state_first)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.loading.remove()
            self.handle = self.loading = None

    def _stepped(self, session) -> None:
        if self.warned or session.spec is not None or session._before_at is None:
            return
        if session._before_at == session.step - 1:  # before_step of the last step, and after_step since
            self.warned = True
            warnings.warn(f"optimizer.step() after session.after_step() (session step {session.step}): after_step "
                          "ends the step (the next step's masks and freezes are set from the weights), so it ran on "
                          "the weights before the update it should follow; call session.before_step(), optimizer.step(), "
                          "session.after_step() in this order", RuntimeWarning, stacklevel=4)


def _model_state_first(saved_under: list[str]) -> str:
    return (f"model.load_state_dict: the checkpoint holds weights under masks and quantizers the model has not "
            f"attached yet ({saved_under[0]}, {len(saved_under)} such keys): call session.load_state_dict(state) "
            "first (it rebuilds them at the saved step), then model.load_state_dict, then optimizer.load_state_dict")


def _saved_under_parametrizations(module: torch.nn.Module, keys) -> list[str]:
    own = set(module.state_dict(keep_vars=True))
    return [k for k in keys if ".parametrizations." in k and k not in own]


def _loading_strictly() -> bool:
    """Whether the nn.Module.load_state_dict call running now was asked for strict=True: torch hands a module's
    load pre-hooks strict=True whatever the caller asked, so it is read from that call's frame (False where no
    such frame is found: a strict=False load, as transformers' Trainer resumes, must go on)."""
    code = torch.nn.Module.load_state_dict.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return bool(frame.f_locals.get("strict", True))
        frame = frame.f_back
    return False


def refuse_model_state_first(module: torch.nn.Module, state_dict, prefix, *_) -> None:
    """A load_state_dict pre-hook on the session's model: a checkpoint's model state loaded strictly before
    session.load_state_dict (which rebuilds the masks and quantizers the saved keys belong to) ended in torch's
    raw list of missing and unexpected `parametrizations` keys, the order's fix said only in a warning before it.
    Refused by name; a strict=False load goes on, warn_model_state_first saying what it skipped."""
    if not prefix and _loading_strictly():
        saved_under = _saved_under_parametrizations(module, state_dict)
        if saved_under:
            raise TrainingError(_model_state_first(saved_under))


def warn_model_state_first(module: torch.nn.Module, incompatible) -> None:
    """A load_state_dict post-hook on the session's model: with strict=False (transformers' Trainer loads that
    way) a checkpoint's model state loaded before session.load_state_dict skipped the weights saved under masks and
    quantizers, unsaid (a strict load is refused before it starts: refuse_model_state_first)."""
    saved_under = [k for k in incompatible.unexpected_keys if ".parametrizations." in k]
    if saved_under:
        warnings.warn(_model_state_first(saved_under), RuntimeWarning, stacklevel=4)


def refuse_optimizer_state_first(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A load_state_dict pre-hook on a bound optimizer: its state loaded before session.load_state_dict (which adds
    the groups of the techniques attached by the saved step) failed in torch with "a different number of groups"."""
    saved = len(state.get("param_groups", [])) if isinstance(state, Mapping) else 0
    if saved > len(optimizer.param_groups):
        raise TrainingError(
            f"optimizer.load_state_dict: the checkpoint's optimizer has {saved} parameter groups and this one "
            f"{len(optimizer.param_groups)}: the techniques attached by the saved step add theirs. Call "
            "session.load_state_dict(state) first, then model.load_state_dict, then optimizer.load_state_dict")


def session_identity(session) -> dict:
    """What a session's checkpoint must match to be resumed into another session: the recipe that runs
    (techniques, their windows and targets; not the settings of memory alone, such as
    training.micro_batches) and total_steps (where the windows are placed)."""
    return {"recipe": without_memory_fields(session.recipe.model_dump(mode="json")), "total_steps": session.plan.total_steps}


def check_fits(session, state: dict) -> None:
    """Refuse a session checkpoint made under another recipe or total_steps, as compress(resume=True)
    refuses a run checkpoint: its masks, scores and step belong to another schedule (a different sparsity
    loaded silently; another total_steps failed with torch's raw missing/unexpected keys). A checkpoint
    saved before the identity was stored is not checked."""
    saved = state.get("identity")
    if saved is None:
        return
    mine, saved_recipe = session_identity(session), without_memory_fields(with_added_fields(saved["recipe"]))
    if saved_recipe != mine["recipe"]:
        # the target first: the bytes it resolves to (size_budget.target_bytes, techniques the joint form adds) are
        # derived fields the user never wrote, named at indices their recipe does not have
        where = (first_difference(saved_recipe.get("target"), mine["recipe"].get("target"), "target")
                 or first_difference(saved_recipe, mine["recipe"]) or "recipe")
        raise RecipeError(
            f"session.load_state_dict: the checkpoint was made with a different recipe ({where}); resume with the "
            "same recipe the checkpointed session was prepared with, or start a new run")
    if saved["total_steps"] != mine["total_steps"]:
        raise TrainingError(
            f"session.load_state_dict: the checkpoint's session was prepared with total_steps={saved['total_steps']}, "
            f"this one with total_steps={mine['total_steps']}; the techniques' windows (pruning ramp, LSQ start) are "
            f"placed on it: prepare(..., total_steps={saved['total_steps']}) to resume, or start a new run")


def first_difference(a, b, path: str = "") -> str | None:
    """The first place two JSON-like values differ, as 'path: A in the checkpoint, B now' (None if equal)."""
    from ..training.checkpoints import differences

    found = differences(a, b, path)
    return found[0] if found else None


"""Finalize what a session compressed: the core models through finalize.py, Hugging Face
models with head / FFN / layer pruning through hf/finalize.py (units removed physically).

One code path for both ways in: `session.finalize()` and `Result.finalize()` (api.compress)
both end in `finalize_compressed`, so a model compressed by the built-in loop is finalized
exactly as one driven from the user's loop (HF FFN neurons were left masked, with their
hooks on, when compress()'s Result went through the core finalize alone).
"""
from __future__ import annotations

UNIT_KINDS = ("prune_heads", "prune_ffn", "prune_layers")


def finalize_session(session, example_inputs=None):
    """Finalize session.model in place; returns the CompressionSpec (bits, step sizes, plan)."""
    example = example_inputs if example_inputs is not None else session.ctx.example_inputs
    return finalize_compressed(session.model, session.techniques, session.recipe, example)


def finalize_compressed(model, techniques, recipe, example_inputs):
    """Finalize `model` in place given the techniques that trained it and the recipe that ran;
    returns the CompressionSpec with the recipe recorded (the artifact's manifest keeps it).

    HF head / FFN / layer pruning removes its units physically (hf.finalize, which also takes the
    mask hooks off); everything else goes through the core finalize (masks applied, LSQ baked,
    pruned channels removed), which traces the model on `example_inputs`."""
    recorded = recipe.model_dump(mode="json")
    for t in techniques:
        if t.attached:
            t.before_finalize()
    if any(t.kind in UNIT_KINDS and t.attached for t in techniques):
        from ..hf.finalize import finalize_hf_with_spec

        _, spec = finalize_hf_with_spec(model, techniques)
        spec.recipe = recorded
        return spec
    from ..finalize import finalize

    spec = finalize(model, example_inputs, recipe=recorded)
    _warn_unsavable_folder(model)
    return spec


def _warn_unsavable_folder(model) -> None:
    """A transformers model whose widths its config cannot record (a ViT's MLP narrowed by prune_structured): its own
    save_pretrained wrote, without a word, a folder from_pretrained refused with a size mismatch
    (CompressionTrainer.save_model and export_folder refuse it). Said once it is finalized, with the saves that work."""
    if not (hasattr(model, "config") and callable(getattr(model, "save_pretrained", None))):
        return
    import warnings

    from ..errors import ArtifactError
    from ..hf.export import check_config_builds

    try:
        check_config_builds(model, "model.save_pretrained")
    except ArtifactError as err:
        warnings.warn(str(err), stacklevel=4)

"""Finalize what a session compressed: the core models through finalize.py, Hugging Face
models with head / FFN / layer pruning through hf/finalize.py (units removed physically)."""
from __future__ import annotations

UNIT_KINDS = ("prune_heads", "prune_ffn", "prune_layers")


def finalize_session(session, example_inputs=None):
    """Finalize session.model in place; returns the CompressionSpec (bits, step sizes, plan)."""
    if any(t.kind in UNIT_KINDS and t.attached for t in session.techniques):
        from ..hf.finalize import finalize_hf_with_spec

        _, spec = finalize_hf_with_spec(session.model, session.techniques)
        spec.recipe = session.recipe.model_dump(mode="json")
        return spec
    from ..finalize import finalize

    example = example_inputs if example_inputs is not None else session.ctx.example_inputs
    return finalize(session.model, example, recipe=session.recipe.model_dump(mode="json"))

"""The architecture matrix: transformers' own classes (tiny random configs) through
compress (pruning + LSQ, or the joint mode under a byte budget) -> finalize -> save -> load -> ONNX,
with parity at every stage.

Every supported architecture must pass every stage with the masked model's logits kept
within 1e-4 (relative); an unsupported combination must stop with a JointCompressError that
names the module and the reason. benchmarks/arch_matrix.py prints the same matrix as a table.
"""
import re

import pytest
import torch

from arch_models import ARCHS, CAUSAL, JOINT_KINDS, STAGES, build, data, run_cell

KINDS = ("prune_unstructured", "prune_structured", "joint", "joint_form")
SLOW = {("mobilenetv2", "prune_structured"), ("mobilenetv2", "prune_unstructured"), ("mobilenetv2", "joint"),
        ("mobilenetv2", "joint_form"), ("vit", "prune_structured")}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cases():
    for arch in ARCHS + CAUSAL:
        for kind in KINDS if arch in ARCHS else JOINT_KINDS:  # GPT-2 compressed and generating: tests/test_causal_lm.py
            marks = [pytest.mark.slow] if (arch, kind) in SLOW else []
            yield pytest.param(arch, kind, marks=marks, id=f"{arch}-{kind}")


@pytest.mark.parametrize("arch, kind", list(_cases()))
def test_architecture_goes_through_every_stage(arch, kind, tmp_path):
    result = run_cell(arch, kind, tmp_path)
    assert list(result) == list(STAGES), result
    assert all(status == "ok" for status, _ in result.values()), result
    if kind in JOINT_KINDS:  # the size budget lands the weights file within 2% of its target on every architecture
        off = float(re.search(r"([+-][0-9.]+)% vs the", result["save"][1]).group(1))
        assert abs(off) <= 2.0, result["save"]


@pytest.mark.parametrize("arch, kind", [("convnext", "joint_form"), ("conv3d", "prune_structured"), ("torch-lstm", "joint"),
                                        ("gpt2", "joint_form")])
def test_bf16_training_goes_through_every_stage(arch, kind, tmp_path):
    """training.precision: bf16 (the forward in bfloat16 autocast); every cell of the matrix passed it once
    (an ad hoc run), these four stay in the suite: depthwise and 3-D convolutions, a recurrent net, a causal LM."""
    result = run_cell(arch, kind, tmp_path, precision="bf16")
    assert list(result) == list(STAGES) and all(status == "ok" for status, _ in result.values()), result


def test_causal_lm_structured_is_a_clear_error(tmp_path):
    """GPT-2 cannot be traced for channel groups (its attention concatenates past keys): a named error, not a TypeError."""
    result = run_cell("gpt2", "prune_structured", tmp_path)
    status, message = result["compress"]
    assert status == "error" and list(result) == ["compress"], result
    assert message.startswith("UnsupportedModelError: structured pruning cannot trace")
    assert "after module 'hf.transformer.h.0." in message and "prune_unstructured" in message


@pytest.mark.parametrize("arch", ["convnext", "vit", "bert"])
def test_channels_through_layernorm_are_left_out(arch):
    """The residual stream of a ConvNeXt / ViT / BERT block passes through LayerNorm: never pruned."""
    from jointcompress.graph import discover_groups

    groups, skipped = discover_groups(build(arch), data(arch)[0][:2])
    reasons = " ".join(r for _, r in skipped)
    assert "whose statistics mix channels" in reasons
    pruned = {m.module for g in groups for m in g.members}
    assert not any("layernorm" in name.lower() for name in pruned), pruned
    assert groups and all("fc1" in g.name or "pwconv1" in g.name or "intermediate" in g.name or "pooler" in g.name
                          for g in groups), [g.name for g in groups]

"""The MobileNetV2-style reference model (models.SmallMobileNet): its depthwise convolutions are coupled
channel for channel to their expansion, and the joint form under a size target removes them together,
lands the file on the target and finalizes without changing the logits."""
import torch

from jointcompress import compress, finalize
from jointcompress.artifact import load, save
from jointcompress.artifact.size import dense_fp32_bytes
from jointcompress.graph import discover_groups
from jointcompress.models import SmallMobileNet, build_model


def test_each_depthwise_convolution_is_one_group_with_its_expansion():
    model = build_model("mobilenet").eval()
    groups, skipped = discover_groups(model, torch.randn(2, 1, 28, 28))
    members = {g.name: {m.module for m in g.out_members()} for g in groups}
    for i in range(5):  # the depthwise layer's channels are its expansion's outputs: one decision for both
        assert {f"blocks.{i}.expand.0", f"blocks.{i}.depthwise.0"} <= members[f"blocks.{i}.depthwise.0"]
    residual = next(names for names in members.values() if "blocks.0.project.0" in names)
    assert "stem.0" in residual  # the stem's channels are added back after the first block
    assert skipped == [("fc", "its output is the model output (classes are never removed)")]


def test_the_joint_form_lands_the_file_and_keeps_the_logits_through_finalize_and_load(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(96, 1, 16, 16), torch.randint(0, 10, (96,))  # 16x16: quicker, the couplings the same
    model = SmallMobileNet(width=8)  # half the reference width: the same couplings, a quicker test
    recipe = {"mode": "joint", "target": {"ratio": 10}, "training": {"epochs": 3, "batch_size": 32},
              "techniques": [{"type": "prune_structured", "sparsity": 0.25}, {"type": "quant_lsq", "bits": 4}]}
    result = compress(model, recipe, (x, y), lambda m: 0.0)
    probe = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        masked = model.eval()(probe)
    spec = finalize(model, result.example_inputs)
    assert model.blocks[1].depthwise[0].out_channels < 32  # channels physically removed
    assert model.blocks[1].depthwise[0].out_channels == model.blocks[1].expand[0].out_channels
    with torch.no_grad():
        assert torch.allclose(model(probe), masked, atol=1e-5)
    save(model, spec, tmp_path / "a", builder=lambda: SmallMobileNet(width=8), example_inputs=result.example_inputs)
    goal = dense_fp32_bytes(SmallMobileNet(width=8)) / 10
    assert goal * 0.97 <= (tmp_path / "a" / "weights.jcw").stat().st_size <= goal
    with torch.no_grad():
        assert torch.allclose(load(tmp_path / "a", lambda: SmallMobileNet(width=8)).eval()(probe), masked, atol=1e-5)


def test_dry_run_says_why_the_default_stride_cannot_be_raised_inside_a_residual_block():
    """The stem already runs at stride 2, so raise_stride's default is block 0's expansion, whose residual
    addition then meets a map of the other size: the note named only a flatten into a Linear."""
    from jointcompress.strides import stride_note

    note = stride_note(build_model("mobilenet"), torch.randn(2, 1, 28, 28))
    assert "'blocks.0.expand.0' at stride 2" in note and "a residual addition" in note

"""One size model: the allocator's predicted bytes equal the file finalize + save write (LeNet-5)."""
import pytest
import torch
from torch.nn.utils import parametrize

from jointcompress.artifact import save
from jointcompress.finalize import finalize
from jointcompress.models import LeNet5
from jointcompress.recipe import parse_recipe
from jointcompress.targets import Candidate, TargetError, allocate_size
from jointcompress.techniques.bias_quant import attach_bias_quant
from jointcompress.techniques.quant_lsq import LSQWeight


def _recipe(ratio, scale_format="fp16", bias_format="fp16", min_keep=0.001):
    return parse_recipe({"name": "size", "model": "lenet5", "target": {"ratio": ratio}, "techniques": [
        {"type": "prune_unstructured", "sparsity": 0.0, "scope": "layer", "end": 0.5, "min_keep": min_keep},
        {"type": "quant_lsq", "bits": 4, "start": 0.6, "scale_format": scale_format, "bias_format": bias_format}]})


def _apply_with_training_quantizers(model, alloc, recipe):
    """The allocation as a run would finalize it: magnitude masks applied, LSQ and bias
    fake-quantization attached (steps initialised from the pruned weights), then finalize."""
    quant = recipe.technique("quant_lsq")
    cand = Candidate(model, list(alloc.bits), list(alloc.bits), True)
    for name, bits in alloc.bits.items():
        layer = model.get_submodule(name)
        with torch.no_grad():
            layer.weight.mul_(cand._kept(name, alloc.sparsity[name]))
        q = LSQWeight(layer.weight.detach(), bits)
        q.step_format = quant.stored_scale_format
        parametrize.register_parametrization(layer, "weight", q)
        attach_bias_quant(layer, q, quant.bias_format)
        _ = layer.weight
    return finalize(model)


@pytest.mark.parametrize("ratio,formats", [(50, ("fp16", "fp16")), (200, ("fp16", "fp16")), (400, ("log8", "int"))])
def test_allocator_prediction_equals_the_written_file_within_1_percent(tmp_path, ratio, formats):
    torch.manual_seed(0)
    model = LeNet5()
    x = torch.randn(2, 1, 28, 28)
    recipe = _recipe(ratio, *formats)
    alloc = allocate_size(model, recipe, x)
    spec = _apply_with_training_quantizers(model, alloc, recipe)
    manifest = save(model, spec, tmp_path, builder=LeNet5, example_inputs=x)
    on_disk = (tmp_path / "weights.jcw").stat().st_size
    assert on_disk == manifest["weights_file_bytes"]
    assert abs(on_disk / alloc.bytes - 1) <= 0.01, (on_disk, alloc.bytes)
    assert abs(on_disk / alloc.target_bytes - 1) <= 0.02
    from jointcompress.artifact import load

    with torch.no_grad():
        assert torch.equal(load(tmp_path, LeNet5)(x), model.eval()(x))  # the artifact loads with parity
    layer = manifest["layers"]["fc1"]["parts"]
    assert layer["scale"]["format"] == formats[0] and layer["bias"]["format"] == formats[1]


def test_unreachable_target_names_its_floors_in_bytes():
    with pytest.raises(TargetError) as err:
        allocate_size(LeNet5(), _recipe(2000, min_keep=0.01), torch.randn(2, 1, 28, 28))
    msg = str(err.value)
    assert "fc1 keeps 4,000 of 400,000 weights = " in msg and " B" in msg and "scales " in msg
    assert "prune_unstructured.min_keep" in msg


def test_a_width_the_user_wrote_moved_by_the_allocator_is_said():
    """quant_lsq.bits 2 under a target that even the unpruned 2-bit model undershoots trained at a wider width, and
    only the table's bits column said so; a width left at its default moves without a word."""
    import warnings

    def recipe(bits):
        quant = {"type": "quant_lsq", **({"bits": bits} if bits else {})}
        return parse_recipe({"model": "lenet5", "target": {"ratio": 12}, "techniques": [
            {"type": "prune_unstructured", "end": 0.5}, quant]})

    with pytest.warns(UserWarning, match=r"quant_lsq.bits 2 is raised to [3-8]: even the model without pruning"):
        alloc = allocate_size(LeNet5(), recipe(2), torch.randn(2, 1, 28, 28))
    assert min(alloc.bits.values()) > 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        allocate_size(LeNet5(), recipe(None), torch.randn(2, 1, 28, 28))

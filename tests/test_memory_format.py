"""Weights in channels_last memory format train and finalize like contiguous ones."""
import copy

import torch
import torch.nn as nn

from jointcompress import compress
from jointcompress.artifact import save
from jointcompress.data import evaluator
from jointcompress.recipe import parse_recipe
from jointcompress.targets import target_bytes
from jointcompress.techniques.size_projection import set_flat


def test_set_flat_writes_the_logical_positions_in_place_for_any_layout():
    """The size projection's cuts index weights in row-major order; a channels_last conv weight
    has no flat view (`.view(-1)` raised) and a reshape would have written into a copy."""
    weight = torch.randn(8, 4, 3, 3)
    lasting = weight.clone().to(memory_format=torch.channels_last)
    assert not lasting.is_contiguous()
    index = torch.tensor([0, 5, 37, 200, 287])
    set_flat(weight, index, 0.0)
    set_flat(lasting, index, 0.0)
    assert torch.equal(weight, lasting) and lasting.is_contiguous(memory_format=torch.channels_last)
    assert int((lasting == 0).sum()) == 5


def test_a_channels_last_cnn_lands_on_its_size_target(digits, tmp_path):
    """`mode: joint` under a ratio target cut weights in place through a flat view and raised
    `view size is not compatible with input tensor's size and stride` on a channels_last model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 10)).to(memory_format=torch.channels_last)
    teacher = copy.deepcopy(model)
    recipe = {"mode": "joint", "target": {"ratio": 30},
              "techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True},
                             {"type": "size_budget", "decide_steps": 20}],
              "training": {"epochs": 2, "batch_size": 64, "lr": 0.002}}
    result = compress(model, recipe, (digits.x_train[:1024], digits.y_train[:1024]),
                      evaluator(digits.x_test, digits.y_test), teacher=teacher, distributed=False)
    x = torch.as_tensor(digits.x_test[:64])
    with torch.no_grad():
        masked = model.eval()(x)
        spec = result.finalize()
        assert torch.allclose(model(x), masked, atol=1e-5)  # finalize keeps the logits
    manifest = save(model, spec, tmp_path / "a", example_inputs=result.example_inputs)
    goal = target_bytes(teacher, parse_recipe(recipe).target)
    assert abs(manifest["weights_file_bytes"] - goal) / goal < 0.02

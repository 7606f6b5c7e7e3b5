"""Small models and a stand-in for the core's finalize(), shared by the artifact/deploy/bench tests.

`fake_finalize` produces exactly what the contract with the core promises: structurally pruned
(physically smaller) layers, weights equal to q * scale with q on a symmetric b-bit grid, some
weights exactly zero, and the Torch-Pruning history that rebuilds the shrunken architecture.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from jointcompress.graph import PRUNABLE_ROOTS, build_graph, discover_groups
from jointcompress.spec import CompressionSpec, LayerSpec


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class SmallCNN(nn.Module):
    """LeNet-5-like, with BatchNorm so pruning must also shrink BN statistics."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 5, padding=2), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 5), nn.BatchNorm2d(16)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """Stem + one residual block: the stem's channels are coupled through the skip connection."""

    def __init__(self, c=8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.block = Block(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.block(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def example_input(batch=2):
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def randomize_bn(model: nn.Module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def prune_channels(model: nn.Module, example, fraction=0.5):
    """Physically remove `fraction` of every prunable group's channels; returns the history."""
    import torch_pruning as tp

    groups, _ = discover_groups(model, example)
    modules = dict(model.named_modules())
    dg = build_graph(model, example)
    for grp in groups:
        root = modules[grp.name]
        n = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        idxs = list(range(0, n, 2))[: int(n * fraction)]
        dg.get_pruning_group(root, fn, idxs).prune()
    return [list(h) for h in dg.pruning_history()]


def quantize_weights(model: nn.Module, bits=4, zero_fraction=0.5, seed=0) -> dict[str, LayerSpec]:
    """Put every Linear/Conv2d weight on a per-channel symmetric grid and zero a fraction of it."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    qmax = 2 ** (bits - 1) - 1
    for name, m in model.named_modules():
        if not isinstance(m, PRUNABLE_ROOTS):
            continue
        w = m.weight.data
        scale = w.abs().flatten(1).amax(1).clamp_min(1e-8) / qmax
        s = scale.view(-1, *([1] * (w.dim() - 1)))
        q = torch.round(w / s).clamp(-qmax, qmax)
        q[torch.rand(q.shape, generator=g) < zero_fraction] = 0
        m.weight.data = q * s
        layers[name] = LayerSpec(bits=bits, scale=scale.clone())
    return layers


def fake_finalize(model: nn.Module, example, bits=4, prune=0.5, zero_fraction=0.5, seed=0):
    torch.manual_seed(seed)
    randomize_bn(model, seed)
    model.eval()
    history = prune_channels(model, example, prune) if prune else []
    spec = CompressionSpec(layers=quantize_weights(model, bits, zero_fraction, seed), pruning_history=history,
                           recipe={"name": "test", "bits": bits})
    return model, spec

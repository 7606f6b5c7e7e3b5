"""The layer types the techniques compress, named once.

A weight whose first axis is the layer's output channels: Linear `[out, in]` and the
convolutions `[out, in / groups, *kernel]` in one, two or three dimensions (audio and other
signals, images, video). Masks, quantizers, the artifact's per-channel steps and structured
pruning all act along that axis. Transposed convolutions store `[in, out / groups, *kernel]`
and are left out, as is transformers' Conv1D (`[in, out]`; hf.causal.conv1d_to_linear converts it).
"""
from __future__ import annotations

import torch.nn as nn

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # per-channel affine: pruned with the channel
COMPRESSIBLE = (nn.Linear, *CONVOLUTIONS)
TRANSPOSED_CONVOLUTIONS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)  # left out: named in hints

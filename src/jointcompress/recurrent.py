"""torch's `nn.LSTM`, `nn.GRU` and `nn.RNN` as `nn.Linear` layers, so their weights are compressed.

A recurrent module keeps each layer's input and recurrent weights as loose parameters
(`weight_ih_l0`, `weight_hh_l0`, `..._reverse`) that belong to no Linear layer, so the techniques,
which act on Linear and convolution weights, store them as they are: in a speech or text model
built on `nn.LSTM` they are most of the weights. `rnn_to_linear` swaps every such module for a
`LinearRNN` that computes the same function (same arguments, same outputs) with `ih_l{k}` and
`hh_l{k}` as plain Linear layers (the same step as `attention.mha_to_linear` for torch's attention).
After `finalize`, `linear_to_rnn` puts torch's own module back, holding the compressed weights: its
fused kernel is the fast one at inference.

The converted module runs its time loop in Python (the input projection of a whole sequence is one
matrix product, the recurrent one a product per step; benchmarks/recurrent_speed.py times it against
torch's fused kernel); the quantized recurrent weight is computed once per forward, not per step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from .conversions import named_hint, require_plain, swap_modules
from .errors import JointCompressError

RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
MERGEABLE = ("LSTM", "RNN_TANH", "RNN_RELU")  # the input and recurrent biases only ever appear summed


class LinearRNN(nn.Module):
    """`nn.LSTM` / `nn.GRU` / `nn.RNN`'s forward over Linear layers: `ih_l{k}` (the input projection of
    layer k, all gates) and `hh_l{k}` (the recurrent one), `_reverse` for the backward direction."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 merged_biases: bool = False):
        super().__init__()
        if merged_biases and mode not in MERGEABLE:
            raise JointCompressError(f"merge_biases: {mode}'s recurrent bias of its new gate is multiplied by the reset "
                                     "gate, so it cannot join the input bias; convert it without merge_biases")
        self.mode, self.hidden_size, self.num_layers = mode, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout, self.bidirectional = bias, batch_first, dropout, bidirectional
        gates = GATES[mode] * hidden_size
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size * self.directions
            for suffix in self.suffixes:
                self.add_module(f"ih_l{layer}{suffix}", nn.Linear(width, gates, bias=bias))
                self.add_module(f"hh_l{layer}{suffix}", nn.Linear(hidden_size, gates, bias=bias and not merged_biases))

    proj_size = 0  # torch's attribute: from_rnn converts no LSTM with a projection

    def flatten_parameters(self) -> None:
        """torch's cuDNN weight packing, which code written for nn.LSTM calls in its forward: nothing to pack here."""

    @property
    def input_size(self) -> int:
        """The features of each step: the first input projection's width (structured pruning of the layer
        before may have shrunk it)."""
        return self.ih_l0.in_features

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    @classmethod
    def from_rnn(cls, rnn: nn.RNNBase, name: str = "", merge_biases: bool = False) -> "LinearRNN":
        """The same function as `rnn`, its weights copied exactly (with `merge_biases`, an LSTM's or RNN's
        two biases of every gate as one, on `ih`: the same function to float rounding, half the bias bytes)."""
        if getattr(rnn, "proj_size", 0):
            raise JointCompressError(f"'{name}': nn.LSTM with proj_size={rnn.proj_size} has no Linear form here; "
                                     "compress it without proj_size, or leave it out (it is then stored as it is)")
        merge = merge_biases and rnn.bias
        out = cls(rnn.mode, rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.bias, rnn.batch_first, rnn.dropout,
                  rnn.bidirectional, merge).to(device=rnn.weight_ih_l0.device, dtype=rnn.weight_ih_l0.dtype)
        out.train(rnn.training)
        with torch.no_grad():
            for key, value in rnn.named_parameters():
                kind, part, layer = key.split("_", 2)  # weight_ih_l0_reverse -> weight, ih, l0_reverse
                linear = getattr(out, f"{part}_{layer}")
                if kind == "weight":
                    linear.weight.copy_(value)
                elif part == "ih":
                    linear.bias.copy_(value + getattr(rnn, f"bias_hh_{layer}") if merge else value)
                elif not merge:
                    linear.bias.copy_(value)
        return out

    def to_rnn(self, name: str = "") -> nn.RNNBase:
        """torch's module with these (finalized) weights."""
        require_plain(name, self.children())
        kind = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(self.mode, nn.RNN)
        extra = {"nonlinearity": self.mode[4:].lower()} if kind is nn.RNN else {}
        first = self.ih_l0.weight
        rnn = kind(self.input_size, self.hidden_size, self.num_layers, bias=self.bias, batch_first=self.batch_first,
                   dropout=self.dropout, bidirectional=self.bidirectional, device=first.device, dtype=first.dtype,
                   **extra)
        with torch.no_grad():
            for key, value in rnn.named_parameters():
                kind, part, layer = key.split("_", 2)  # weight_ih_l0_reverse -> weight, ih, l0_reverse
                linear = getattr(self, f"{part}_{layer}")
                source = linear.weight if kind == "weight" else linear.bias
                if source is None:  # merged biases: the input projection holds their sum
                    value.zero_()
                    continue
                if source.shape != value.shape:
                    raise JointCompressError(f"'{name}.{part}_{layer}' is {tuple(source.shape)}, torch's module needs "
                                             f"{tuple(value.shape)} (structured pruning shrank it): keep the LinearRNN")
                value.copy_(source)
        rnn.train(self.training)
        return rnn

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            raise JointCompressError("LinearRNN: a PackedSequence input is not supported; pass the padded tensor "
                                     "(and take each sequence's last valid step), or keep this module as torch's")
        # torch's own messages; not while tracing (an ONNX export), where the check read as a value fixed by the tracer
        if not torch.jit.is_tracing() and (input.dim() not in (2, 3) or input.shape[-1] != self.input_size):
            raise RuntimeError(f"input must have 2 or 3 dimensions and input.size(-1) must be equal to input_size. "
                               f"Expected {self.input_size}, got {tuple(input.shape)}")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)
        h0, c0 = self._initial_state(hx, x, batched)
        finals_h, finals_c = [], []
        for layer in range(self.num_layers):
            outputs = []
            for d, suffix in enumerate(self.suffixes):
                i = layer * self.directions + d
                out, h, c = self._direction(x, f"l{layer}{suffix}", h0[i], None if c0 is None else c0[i], d == 1)
                outputs.append(out)
                finals_h.append(h)
                finals_c.append(c)
            x = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        output = x.transpose(0, 1) if batched and self.batch_first else x
        h_n = torch.stack(finals_h)
        state = (h_n, torch.stack(finals_c)) if self.mode == "LSTM" else h_n
        if not batched:
            output = output.squeeze(1)
            state = tuple(s.squeeze(1) for s in state) if self.mode == "LSTM" else state.squeeze(1)
        return output, state

    def _initial_state(self, hx, x: torch.Tensor, batched: bool):
        """(h0, c0) as [layers * directions, batch, hidden] (c0 None but for LSTM); zeros where hx is None."""
        if hx is None:
            zeros = x.new_zeros(self.num_layers * self.directions, x.shape[1], self.hidden_size)
            return zeros, zeros if self.mode == "LSTM" else None
        h0, c0 = hx if self.mode == "LSTM" else (hx, None)
        if not batched:
            h0, c0 = h0.unsqueeze(1), None if c0 is None else c0.unsqueeze(1)
        expected = (self.num_layers * self.directions, x.shape[1], self.hidden_size)
        for state in (h0, c0):
            if state is not None and tuple(state.shape) != expected:
                raise RuntimeError(f"Expected hidden size {expected}, got {tuple(state.shape)}")
        return h0, c0

    def _direction(self, x: torch.Tensor, key: str, h: torch.Tensor, c: torch.Tensor | None, reverse: bool):
        """One layer in one direction over the sequence x [T, B, in]: (outputs [T, B, H], h_T, c_T)."""
        # every step's input projection in one product; unbind, not indexing: one backward node for
        # all steps (each index's backward would write a sequence-sized gradient: quadratic in T)
        projected = getattr(self, f"ih_{key}")(x).unbind(0)
        recurrent = getattr(self, f"hh_{key}")
        steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        outputs = [None] * x.shape[0]
        with parametrize.cached():  # a quantized recurrent weight is computed once, not once per step
            for t in steps:
                h, c = self._cell(projected[t], recurrent(h), h, c)
                outputs[t] = h
        return torch.stack(outputs), h, c

    def _cell(self, xg: torch.Tensor, hg: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
        """One step from the input's and the state's gate pre-activations (torch's gate order)."""
        if self.mode == "LSTM":
            i, f, g, o = (xg + hg).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        if self.mode == "GRU":
            xr, xz, xn = xg.chunk(3, dim=-1)
            hr, hz, hn = hg.chunk(3, dim=-1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return (1 - z) * n + z * h, None
        pre = xg + hg
        return (torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)), None

    def extra_repr(self) -> str:
        return (f"{self.mode}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}, bidirectional={self.bidirectional}")


def rnn_to_linear(model: nn.Module, merge_biases: bool = False) -> nn.Module:
    """Every `nn.LSTM`, `nn.GRU` and `nn.RNN` in `model` replaced by a `LinearRNN` computing the same
    function, in place; returns the model (the module itself if `model` is one). Call it on the model
    before `compress`, and on the model your `load` builder returns (with the same `merge_biases`).

    `merge_biases`: torch keeps two biases per gate (input and recurrent) where an LSTM or RNN only ever
    uses their sum; stored in fp16 they can be a quarter of a small LSTM's file at high ratios. Merged,
    the input projection holds the sum and the recurrent one none (a GRU keeps both: its new gate's
    recurrent bias is multiplied by the reset gate)."""
    def convert(module: nn.Module, name: str) -> LinearRNN:
        return LinearRNN.from_rnn(module, name, merge_biases and module.mode in MERGEABLE)

    return swap_modules(model, RECURRENT, convert)


def linear_to_rnn(model: nn.Module) -> nn.Module:
    """The reverse of `rnn_to_linear` on a finalized model: torch's own modules back, holding the
    compressed weights, in place; returns the model."""
    return swap_modules(model, LinearRNN, lambda m, name: m.to_rnn(name))


def packed_recurrent(model: nn.Module) -> list[str]:
    """Names of the recurrent modules whose weights no technique compresses."""
    return [name for name, m in model.named_modules() if isinstance(m, RECURRENT)]


def packed_recurrent_hint(model: nn.Module) -> str:
    """A sentence for size errors and warnings: the recurrent weights left uncompressed, and the
    conversion that compresses them; empty when there are none."""
    return named_hint(packed_recurrent(model), "nn.LSTM / nn.GRU / nn.RNN keep their weights as loose parameters that "
                      "no technique compresses",
                      "jointcompress.recurrent.rnn_to_linear(model) turns them into Linear layers (and on the model "
                      "your load builder returns)")

"""A pure tensor function compiled by Inductor and called without TorchDynamo.

Why: through `torch.compile` every call pays TorchDynamo's frame evaluation, its guards and the
wrappers around the compiled code: 60-220 µs a call on a 2-core CPU, more than the arithmetic of a
layer of a few thousand weights. The zero-level quantizer calls two such kernels per layer per
step, so on small models that fixed cost was a large part of a joint step
(benchmarks/results/step_cost_direct.json). Here the function is traced once per argument layout
with symbolic shapes (`make_fx`), compiled with `torch._inductor.compile` (Inductor's entry point
for graphs captured without TorchDynamo), and called directly: the same generated code, 20-50 µs
a call.

What TorchDynamo's guards check on every call is checked here once per new combination of
argument shapes: the traced graph's assumptions (a size traced as a symbol is in its range, >= 2;
sizes traced as one symbol are equal; sizes traced as constants match: 1 is traced as a constant) and the guards the trace
and the compiler recorded. A combination that fails them gets a graph of its own. Arguments are
made contiguous (the graph was traced with contiguous ones); `None` arguments are part of the
layout, baked into the trace.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class KernelUnavailable(RuntimeError):
    """Tracing or compiling failed for these arguments (the caller runs another path)."""


@dataclass
class _Variant:
    compiled: Callable
    dims: list[tuple[int, int, object]]  # (tensor index, dim, int or sympy symbol)
    ranges: dict  # symbol -> its value range
    conditions: list  # sympy booleans over the symbols (guards and replacements)

    def accepts(self, shapes: list[tuple[int, ...]]) -> bool:
        subs = {}
        for i, j, size in self.dims:
            actual = shapes[i][j]
            if isinstance(size, int):
                if actual != size:
                    return False
            elif subs.setdefault(size, actual) != actual:
                return False
        for sym, actual in subs.items():
            vr = self.ranges.get(sym)
            if vr is not None and not (vr.lower <= actual and (vr.upper.is_infinite or actual <= vr.upper)):
                return False
        return all(bool(c.xreplace(subs)) for c in self.conditions)


class TracedKernel:
    """`fn` (tensors or None in, a tuple of tensors or one tensor out) compiled per layout:
    the dtype, device and rank of each argument (None where it is None), and the thread count
    (Inductor's CPU reductions split by the thread count of their compile)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._variants: dict[tuple, list[_Variant]] = {}
        self._by_shapes: dict[tuple, _Variant] = {}
        self._failed: set[tuple] = set()  # (layout, shapes) that failed: not traced again

    def __call__(self, *args):
        tensors = [a.contiguous() for a in args if a is not None]
        key = (torch.get_num_threads(),) + tuple(None if a is None else (a.dtype, a.device, a.shape) for a in args)
        variant = self._by_shapes.get(key)
        if variant is None:
            variant = self._variant_for(key, args, tensors)
        return variant.compiled(*tensors)

    def _variant_for(self, key: tuple, args, tensors: list) -> _Variant:
        """The variant for arguments of a combination of shapes not seen before."""
        if key in self._failed:
            raise KernelUnavailable("these arguments failed to trace or compile before")
        layout = tuple(None if a is None else (a.dtype, a.device, a.dim()) for a in args) + (torch.get_num_threads(),)
        try:
            variant = self._find_or_trace(layout, args, tensors, [tuple(t.shape) for t in tensors])
        except KernelUnavailable:
            self._failed.add(key)
            raise
        self._by_shapes[key] = variant
        return variant

    def _find_or_trace(self, layout, args, tensors, shapes) -> _Variant:
        for variant in self._variants.get(layout, []):
            if variant.accepts(shapes):
                return variant
        try:
            variant = self._trace(args, tensors)
        except Exception as exc:  # noqa: BLE001 -- any tracer or compiler failure: the caller falls back
            raise KernelUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if not variant.accepts(shapes):  # the arguments it was traced with must pass its own checks
            raise KernelUnavailable("the traced graph's checks reject the arguments it was traced with")
        self._variants.setdefault(layout, []).append(variant)
        return variant

    def _trace(self, args, tensors) -> _Variant:
        from torch.fx.experimental import _config as fx_config
        from torch.fx.experimental.proxy_tensor import make_fx

        slots = [a is not None for a in args]
        returns_tuple = []

        def with_nones(*ts):
            it = iter(ts)
            out = self.fn(*(next(it) if present else None for present in slots))
            returns_tuple.append(isinstance(out, tuple))
            return out if returns_tuple[-1] else (out,)

        with fx_config.patch(use_duck_shape=False):  # equal sizes by chance stay two symbols: one graph for all
            graph = make_fx(with_nones, tracing_mode="symbolic")(*tensors)
        fakes = [n.meta["val"] for n in graph.graph.nodes if n.op == "placeholder"]
        compiled_graph = torch._inductor.compile(graph, fakes)
        run = _generated_code(compiled_graph) or compiled_graph
        call = (lambda *ts: tuple(run(*ts))) if returns_tuple[0] else (lambda *ts: run(*ts)[0])
        return _Variant(call, *_assumptions(fakes))


def _generated_code(compiled_graph) -> Callable | None:
    """The generated code's own entry point (it takes the arguments as a list), where the wrappers
    around it have nothing to do: no input it must copy to an aligned buffer, none it mutates. They
    cost ~8 µs a call, a quarter of a small layer's kernel. None where that cannot be told."""
    inner = getattr(compiled_graph, "current_callable", None)
    if not callable(inner) or getattr(compiled_graph, "inputs_to_check", None) != [] \
            or len(getattr(compiled_graph, "mutated_inputs", (None,))):
        return None
    return lambda *ts: inner(list(ts))


def _assumptions(fakes: list) -> tuple[list, dict, list]:
    """What a graph traced on `fakes` assumes of its arguments' shapes: per dimension its constant
    or its symbol (as created, before the shape environment's replacements), each symbol's range,
    and the guards and replacements the trace and the compiler recorded."""
    import sympy  # here, not at the top: 0.6 s of every process's `import jointcompress` for code only a compile runs

    shape_env = next((f.fake_mode.shape_env for f in fakes if f.fake_mode.shape_env is not None), None)
    dims, symbols = [], set()
    for i, fake in enumerate(fakes):
        for j, size in enumerate(fake.shape):
            expr = getattr(size.node, "_expr", size.node.expr) if isinstance(size, torch.SymInt) else int(size)
            if not isinstance(expr, (int, sympy.Symbol)):
                expr = int(expr) if getattr(expr, "is_number", False) else None
            if expr is None:
                raise KernelUnavailable(f"argument {i} dim {j} traced as an expression")
            dims.append((i, j, expr))
            if isinstance(expr, sympy.Symbol):
                symbols.add(expr)
    if shape_env is None:
        return dims, {}, []
    conditions = [g.expr for g in shape_env.guards]
    conditions += [sympy.Eq(sym, rep) for sym, rep in shape_env.replacements.items()]
    ranges = {s: shape_env.var_to_range[s] for s in symbols if s in shape_env.var_to_range}
    return dims, ranges, conditions

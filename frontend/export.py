"""torch.export of diffusers DiTs into a :class:`DiTGraph`."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ExportError
from .architectures import Adapter, Resolution
from .loading import resolve_model

log = logging.getLogger(__name__)

#: ops kept intact by run_decompositions: the quantizable ops and attention, which every backend
#: (ONNX, the CUDA runtime) wants to see as single nodes.
KEEP_OPS = ("linear.default", "conv2d.default", "conv3d.default", "scaled_dot_product_attention.default")


@dataclasses.dataclass
class DiTGraph:
    """The unit every pass reads and returns: an ExportedProgram plus what produced it.

    ``program`` is a torch.export ``ExportedProgram`` at ATen level (linear, conv and SDPA kept as
    single nodes); dynamic batch/token dimensions where the architecture allows.
    """

    program: torch.export.ExportedProgram
    adapter: Adapter
    config: Mapping[str, Any]
    resolution: Resolution
    example_inputs: dict[str, torch.Tensor]
    dynamic: bool

    @property
    def arch(self) -> str:
        return self.adapter.arch

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.example_inputs)

    def module(self) -> nn.Module:
        return self.program.module()

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        """Run the exported graph (positional inputs, or keywords named as ``input_names``)."""
        if kwargs:
            args = tuple(kwargs[k] for k in self.input_names)
        return self.program.module()(*args)

    def parameter_of(self, node: torch.fx.Node) -> str | None:
        """The parameter name (diffusers naming) a placeholder node stands for, if any."""
        from .architectures import param_name

        sig = self.program.graph_signature
        target = sig.inputs_to_parameters.get(node.name) or sig.inputs_to_buffers.get(node.name)
        return param_name(target) if target is not None else None


def _decomposition_table():
    table = torch.export.default_decompositions()
    for op in KEEP_OPS:
        table.pop(getattr(torch.ops.aten, op.split(".")[0]).default, None)
    return table


def export_model(model: Any, resolution: Resolution | None = None, *, dynamic: bool = True, seed: int = 0,
                 fixups: bool = True) -> DiTGraph:
    """Export a diffusers DiT to a :class:`DiTGraph`.

    ``model`` is a diffusers transformer instance, a diffusers transformer folder, or a builtin
    name (``tiny-flux`` ...). ``resolution`` defaults to the architecture's default. With
    ``dynamic`` the batch and token dimensions are symbolic wherever the architecture allows. The
    architecture's fix-up passes (``frontend.fixups``) run after export unless ``fixups=False``.
    """
    from .loading import default_resolution

    name = model
    model, adapter = resolve_model(model, seed=seed)
    model.eval()
    res = resolution or default_resolution(name, adapter)
    inputs = adapter.example_inputs(model, res, seed=seed)  # validates the resolution
    wrapper = adapter.wrap(model, tuple(inputs))
    dyn = adapter.dynamic_shapes(model, res) if dynamic else None
    if dyn is not None:
        dyn = {"inputs": tuple(dyn.get(k) for k in inputs)}
    _reset_caches(model)
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, tuple(inputs.values()), dynamic_shapes=dyn, strict=False)
            ep = ep.run_decompositions(_decomposition_table())
    except Exception as exc:
        raise ExportError(f"torch.export of {adapter.arch} at {res} failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    graph = DiTGraph(ep, adapter, dict(model.config), res, inputs, dyn is not None)
    if fixups:
        from .fixups import fixup_pipeline

        graph = fixup_pipeline(adapter)(graph).graph
    return graph


def _reset_caches(model: nn.Module) -> None:
    """Drop lazily built caches that would otherwise be baked into the graph as constants
    (Z-Image's RoPE table is computed on first call and kept on a plain Python object)."""
    rope = getattr(model, "rope_embedder", None)
    if rope is not None and hasattr(rope, "freqs_cis"):
        rope.freqs_cis = None

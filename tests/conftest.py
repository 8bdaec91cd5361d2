"""Shared fixtures for the frontend tests.

Exporting a tiny model (torch.export, then ONNX) costs seconds, so every artefact is built once per
test process and memoised in the session-scoped :class:`Artifacts` (``artifacts`` fixture); ONNX
files go under ``tmp_path_factory``. Tests that take a ``tiny_arch`` argument run once per builtin tiny
architecture, tests that take ``dynamic_arch`` once per architecture with dynamic dimensions.

Z-Image's ONNX export depends on LowerComplexToReal (frontend/complex_rope.py), which has landed:
its failures are real failures, not expected ones.

Measured numerical differences are recorded with ``record_property`` (keys ``adatsq:...``) and listed
at the end of the run (this also works under pytest-xdist: properties travel with the reports).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch

from adatsq.frontend.architectures import BUILTINS, Resolution
from adatsq.frontend.export import export_model
from adatsq.frontend.layers import LayerTable
from adatsq.frontend.onnx_io import export_onnx
from adatsq.tools.sysinfo import keep_freed_memory

keep_freed_memory()  # as the CLI does: large tensors reuse freed heap (faster sampling tests)

ARCHS = ("tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-dit", "tiny-wan", "tiny-zimage")
#: Z-Image takes Python lists of per-sample tensors: every dimension is static.
DYNAMIC_ARCHS = tuple(a for a in ARCHS if a != "tiny-zimage")

#: a second resolution per dynamic architecture: other batch, other text length, and for Flux
#: (image tokens), SD3 and Wan (latent height/width; Wan also frames) another latent size.
SECOND_RESOLUTION = {
    "tiny-flux": Resolution(height=12, width=8, text_len=5, batch=3),
    "tiny-sd3": Resolution(height=12, width=8, text_len=5, batch=3),
    "tiny-pixart": Resolution(height=16, width=16, text_len=5, batch=3),
    "tiny-dit": Resolution(height=16, width=16, text_len=1, batch=3),
    "tiny-wan": Resolution(height=12, width=8, text_len=5, frames=5, batch=3),
}

#: which dimensions of each input must be symbolic after export (every other one static).
DYNAMIC_DIMS = {
    "tiny-flux": dict(hidden_states={0, 1}, encoder_hidden_states={0, 1}, pooled_projections={0}, timestep={0},
                      img_ids={0}, txt_ids={0}, guidance={0}),
    "tiny-sd3": dict(hidden_states={0, 2, 3}, encoder_hidden_states={0, 1}, pooled_projections={0}, timestep={0}),
    "tiny-pixart": dict(hidden_states={0}, encoder_hidden_states={0, 1}, timestep={0}),
    "tiny-dit": dict(hidden_states={0}, timestep={0}, class_labels={0}),
    # Wan: frames are dynamic for video example resolutions (the default has 3 frames)
    "tiny-wan": dict(hidden_states={0, 2, 3, 4}, timestep={0}, encoder_hidden_states={0, 1}),
    "tiny-zimage": dict(x=set(), t=set(), cap_feats=set()),
}

EXPORT_ATOL = 1e-5  # exported program vs eager: max abs diff
ONNX_RTOL = 1e-4  # onnxruntime vs torch: max abs diff / max abs reference

_IN_XDIST = "PYTEST_XDIST_WORKER" in os.environ


def pytest_configure(config):
    if _IN_XDIST:
        # two workers on two cores: one intra-op thread each avoids oversubscription
        torch.set_num_threads(1)


def _explicitly_parametrized(metafunc) -> set[str]:
    names: set[str] = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        names |= {a.strip() for a in argnames.split(",")} if isinstance(argnames, str) else set(argnames)
    return names


def pytest_generate_tests(metafunc):
    own = _explicitly_parametrized(metafunc)
    for name, values in (("tiny_arch", ARCHS), ("dynamic_arch", DYNAMIC_ARCHS)):
        if name in metafunc.fixturenames and name not in own:
            metafunc.parametrize(name, values)


def max_abs(a, b) -> float:
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def rel_err(out, ref) -> float:
    ref_np = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    return max_abs(out, ref) / float(np.abs(ref_np).max())


class Artifacts:
    """Per-process memo of tiny models, their exports, layer tables, ONNX files and ORT sessions."""

    ARCHS = ARCHS
    DYNAMIC_ARCHS = DYNAMIC_ARCHS
    SECOND_RESOLUTION = SECOND_RESOLUTION
    DYNAMIC_DIMS = DYNAMIC_DIMS
    EXPORT_ATOL = EXPORT_ATOL
    ONNX_RTOL = ONNX_RTOL

    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self._onnx_dir = None
        self._memo: dict[tuple, Any] = {}
        self._failed: dict[tuple, BaseException] = {}

    def _get(self, key: tuple, build):
        """Build once; a failed build fails every test that needs it, without being retried."""
        if key in self._failed:
            raise self._failed[key]
        if key not in self._memo:
            try:
                self._memo[key] = build()
            except Exception as exc:
                self._failed[key] = exc
                raise
        return self._memo[key]

    # ------------------------------------------------------------------ torch side
    def adapter(self, arch: str):
        return BUILTINS[arch]

    def model(self, arch: str) -> torch.nn.Module:
        """The eager reference: the builtin tiny model, built independently of the export (seed 0)."""
        return self._get(("model", arch), lambda: BUILTINS[arch].tiny(0))

    def graph(self, arch: str):
        """``export_model(arch)``: dynamic, with fix-ups, seed 0 (cached: do not mutate)."""
        return self._get(("graph", arch), lambda: export_model(arch))

    def table(self, arch: str) -> LayerTable:
        return self._get(("table", arch), lambda: LayerTable.from_graph(self.graph(arch)))

    def inputs(self, arch: str, res: Resolution | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        res = res or BUILTINS[arch].default_resolution
        return self._get(("inputs", arch, res, seed),
                         lambda: BUILTINS[arch].example_inputs(self.model(arch), res, seed=seed))

    def eager(self, arch: str, res: Resolution | None = None, seed: int = 0) -> torch.Tensor:
        """Eager output of the reference model on ``inputs(arch, res, seed)``."""
        def build():
            inputs = self.inputs(arch, res, seed)
            wrapped = BUILTINS[arch].wrap(self.model(arch), tuple(inputs))
            with torch.no_grad():
                return wrapped(*inputs.values())

        return self._get(("eager", arch, res, seed), build)

    # ------------------------------------------------------------------ ONNX side
    def onnx_path(self, arch: str):
        def build():
            if self._onnx_dir is None:
                self._onnx_dir = self._tmp.mktemp("onnx")
            path = self._onnx_dir / f"{arch}.onnx"
            export_onnx(self.graph(arch), path, table=self.table(arch))
            return path

        return self._get(("onnx", arch), build)

    def onnx_model(self, arch: str):
        """The ONNX ModelProto as written to disk (cached: copy before mutating)."""
        import onnx

        return self._get(("onnx_model", arch), lambda: onnx.load(str(self.onnx_path(arch))))

    def session(self, arch: str):
        return self._get(("session", arch), lambda: make_session(self.onnx_path(arch)))

    def run_onnx(self, arch: str, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        sess = self.session(arch)
        feeds = {k: v.detach().numpy() for k, v in inputs.items()}
        assert [i.name for i in sess.get_inputs()] == list(feeds), "ONNX input names/order"
        return sess.run(None, feeds)[0]


def make_session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if _IN_XDIST:
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    return Artifacts(tmp_path_factory)


@pytest.fixture
def seeded():
    """The test starts from the same global RNG state and runs without autograd.

    Used by the frontend test modules through ``pytestmark = pytest.mark.usefixtures("seeded")``
    (not autouse: other test modules in this folder keep their own settings).
    """
    torch.manual_seed(0)
    np.random.seed(0)
    with torch.no_grad():
        yield


def pytest_terminal_summary(terminalreporter):
    rows = []
    for reports in terminalreporter.stats.values():
        for rep in reports:
            for key, value in getattr(rep, "user_properties", ()) or ():
                if isinstance(key, str) and key.startswith("adatsq:"):
                    rows.append((key[len("adatsq:"):], value))
    if rows:
        terminalreporter.section("adatsq measured differences")
        for key, value in sorted(set(rows)):
            terminalreporter.write_line(f"{key:<52} {value:.3e}" if isinstance(value, float) else f"{key} {value}")

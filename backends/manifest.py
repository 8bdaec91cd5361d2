"""The manifest of a lowered build: ``BUILD/onnx/manifest.json``.

It says which ONNX segment runs at which denoising step and pins every file it refers to by
sha256, so that a runner (``backends/ort_runner.py``, the TensorRT backend) can refuse a build
directory whose files were damaged, swapped or made for another plan. Keys other backends read:
``segments[*].file`` / ``segments[*].steps``, ``steps`` (segment name per step), ``inputs`` (name,
elem type, shape with symbolic dims as strings), ``outputs``, ``external_data``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError

FORMAT = "adatsq.onnx-build"
VERSION = 1
MANIFEST = "manifest.json"
ONNX_DIR = "onnx"


class BuildDirError(InputError):
    """A lowered build directory is missing a file, has a damaged one, or does not match its plan."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def row_sha256(row: Sequence[str]) -> str:
    """Hash of one step's precision assignment (layer order of the plan)."""
    return hashlib.sha256(json.dumps(list(row)).encode()).hexdigest()


def load_manifest(onnx_dir: str | Path) -> dict[str, Any]:
    from ..tools.io import read_json

    path = Path(onnx_dir) / MANIFEST
    data = read_json(path, BuildDirError, "no such file (lower the build first: `adatsq build --target onnxruntime`)")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BuildDirError(f"{path}: not an adatsq ONNX build manifest")
    if data.get("version") != VERSION:
        raise BuildDirError(f"{path}: unknown manifest version {data.get('version')!r} (this adatsq reads {VERSION})")
    for key in ("segments", "steps", "inputs", "outputs", "plan", "external_data"):
        if key not in data:
            raise BuildDirError(f"{path}: malformed manifest (no {key!r})")
    names = {s.get("name") for s in data["segments"]}
    bad = [s for s in data["steps"] if s not in names]
    if bad:
        raise BuildDirError(f"{path}: step runs segment {bad[0]!r}, which the manifest does not list")
    for s in data["segments"]:
        if [k for k, n in enumerate(data["steps"]) if n == s["name"]] != list(s["steps"]):
            raise BuildDirError(f"{path}: segment {s['name']} lists steps {s['steps']} that disagree with 'steps'")
    return data


def verify_files(onnx_dir: str | Path, manifest: dict[str, Any], check_sha: bool = True) -> None:
    """Every file the manifest names exists with its recorded size (and sha256)."""
    onnx_dir = Path(onnx_dir)
    entries = [(s["file"], s["sha256"], s["bytes"]) for s in manifest["segments"]]
    ext = manifest["external_data"]
    if ext:
        entries.append((ext["file"], ext["sha256"], ext["bytes"]))
    for extra in manifest.get("files", []):
        entries.append((extra["file"], extra["sha256"], extra["bytes"]))
    for name, sha, size in entries:
        f = onnx_dir / name
        if not f.is_file():
            raise BuildDirError(f"{f}: missing (the manifest lists it); rebuild the ONNX artefacts")
        if f.stat().st_size != size:
            raise BuildDirError(f"{f}: {f.stat().st_size} bytes, the manifest recorded {size} (truncated or replaced)")
        if check_sha and sha256_file(f) != sha:
            raise BuildDirError(f"{f}: sha256 differs from the manifest's (corrupt or replaced)")


def verify_plan(build_dir: str | Path, manifest: dict[str, Any]):
    """The build's plan.json is the one the segments were lowered from; returns the loaded plan."""
    from ..passes.plan import PrecisionPlan

    build_dir = Path(build_dir)
    pf = build_dir / manifest["plan"]["file"]
    if not pf.is_file():
        raise BuildDirError(f"{pf}: missing (the ONNX segments were lowered from it)")
    if sha256_file(pf) != manifest["plan"]["sha256"]:
        raise BuildDirError(f"{pf} does not match {build_dir / ONNX_DIR / MANIFEST} (the plan changed after "
                            "lowering: lower the build again)")
    plan = PrecisionPlan.load(pf)
    if len(manifest["steps"]) != plan.schedule.num_steps:
        raise BuildDirError(f"{build_dir / ONNX_DIR / MANIFEST}: {len(manifest['steps'])} steps, "
                            f"{pf} has {plan.schedule.num_steps}")
    by_seg = {s["name"]: s for s in manifest["segments"]}
    for k, name in enumerate(manifest["steps"]):
        if by_seg[name]["assignment_sha256"] != row_sha256(plan.assignment[k]):
            raise BuildDirError(f"{build_dir / ONNX_DIR / MANIFEST}: segment {name} does not carry step {k}'s "
                                f"precisions of {pf}")
    return plan

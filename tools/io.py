"""Atomic file output: write to a temporary file beside the target, then rename over it.

A crash or an error half-way never leaves a half-written artefact under the target name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> None:
    """``writer(tmp_path)`` writes the artefact; it appears under ``path`` only if writer succeeds."""
    with atomic_path(path) as tmp:
        writer(tmp)


def read_json(path: str | Path, error: type[Exception], missing: str = "no such file") -> object:
    """Parse a JSON file; a missing or malformed file raises ``error`` naming the path."""
    import json

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None


_ST_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64",
              "torch.int8": "I8", "torch.uint8": "U8", "torch.int16": "I16", "torch.int32": "I32",
              "torch.int64": "I64", "torch.bool": "BOOL", "torch.float8_e4m3fn": "F8_E4M3"}


def stream_safetensors(path: str | Path, specs: "list[tuple[str, object, tuple[int, ...]]]",
                       tensors: "Iterator[tuple[str, object]]", metadata: "dict[str, str] | None" = None) -> None:
    """Write a safetensors file whose tensors are produced one at a time, so that a large model's
    weights never need to be in memory together.

    ``specs`` lists every tensor's (name, torch dtype, shape) in the order ``tensors`` will yield
    ``(name, tensor)``: the header (offsets) is written first, then each tensor's bytes as it
    comes. The file appears under ``path`` only when every tensor was written and matched its spec.
    """
    import json
    import struct

    import torch

    header: dict = {}
    offset = 0
    for name, dtype, shape in specs:
        n = 1
        for d in shape:
            n *= int(d)
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[str(dtype)], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad the header to 8 bytes, as safetensors does
    order = [s[0] for s in specs]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        count = 0
        for name, t in tensors:
            if count >= len(order) or name != order[count]:
                raise ValueError(f"stream_safetensors: got {name!r}, expected "
                                 f"{order[count] if count < len(order) else 'no more tensors'}")
            _, dtype, shape = specs[count]
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"stream_safetensors: {name} is {t.dtype}{tuple(t.shape)}, "
                                 f"declared {dtype}{tuple(shape)}")
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            count += 1
        if count != len(order):
            raise ValueError(f"stream_safetensors: {len(order) - count} declared tensors never came")

"""Typed, namespaced annotations on graph nodes, and their ONNX ``metadata_props`` encoding.

Each annotation kind is a frozen dataclass registered under one key in the ``adatsq.`` namespace
(``adatsq.layer``, later ``adatsq.fisher``, ``adatsq.precision`` ...). Passes write and read them
only through :func:`annotate` / :func:`get_annotation`, never by poking ``node.meta`` directly
(the PT2E ``quantization_annotation`` convention). What must survive ONNX export goes through the
single :func:`encode` / :func:`decode` pair: JSON strings in ``metadata_props`` under the same key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Iterator, Mapping, TypeVar

NAMESPACE = "adatsq."
ENCODING_VERSION = 1

_REGISTRY: dict[str, type] = {}
A = TypeVar("A")


_NOT_PORTABLE: set[str] = set()


def register_annotation(key: str, portable: bool = True):
    """Class decorator: register a frozen dataclass as the annotation stored under ``key``.

    ``portable=False`` marks annotations that hold tensors (activation statistics, Hessians): they
    live on the fx graph and in the analysis cache, and are not written into ONNX metadata."""
    if not key.startswith(NAMESPACE):
        raise ValueError(f"annotation key {key!r} must start with {NAMESPACE!r}")

    def deco(cls: type[A]) -> type[A]:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__name__}: annotations must be frozen dataclasses")
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"annotation key {key!r} already registered to {_REGISTRY[key].__name__}")
        _REGISTRY[key] = cls
        if not portable:
            _NOT_PORTABLE.add(key)
        cls.KEY = key  # type: ignore[attr-defined]
        return cls

    return deco


def annotation_types() -> dict[str, type]:
    return dict(_REGISTRY)


def _key_of(value_or_cls: Any) -> str:
    cls = value_or_cls if isinstance(value_or_cls, type) else type(value_or_cls)
    key = getattr(cls, "KEY", None)
    if key is None or _REGISTRY.get(key) is not cls:
        raise TypeError(f"{cls.__name__} is not a registered annotation type")
    return key


def annotate(node: Any, value: Any) -> None:
    """Attach ``value`` (a registered annotation) to an fx node, replacing any of the same kind."""
    node.meta[_key_of(value)] = value


def get_annotation(node: Any, cls: type[A]) -> A | None:
    value = node.meta.get(_key_of(cls))
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"node {getattr(node, 'name', node)}: {_key_of(cls)} holds {type(value).__name__}")
    return value


def iter_annotations(meta: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for key, value in meta.items():
        if key in _REGISTRY and isinstance(value, _REGISTRY[key]):
            yield key, value


# --------------------------------------------------------------------------- JSON encoding
def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if hasattr(value, "value") and type(value).__module__ != "builtins":  # Enum
        return value.value
    return value


def _from_json(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    if data is None:
        return None
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _from_json(hints[f.name], data[f.name]) for f in dataclasses.fields(tp) if f.name in data})
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], d) for d in data)
        return tuple(_from_json(a, d) for a, d in zip(args, data))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in typing.get_args(tp):
            if a is type(None):
                continue
            try:
                return _from_json(a, data)
            except (TypeError, ValueError, KeyError):
                continue
        raise ValueError(f"cannot decode {data!r} as {tp}")
    if isinstance(tp, type) and issubclass(tp, __import__("enum").Enum):
        return tp(data)
    return data


def encode(meta: Mapping[str, Any]) -> dict[str, str]:
    """Annotations found in ``meta`` (an fx ``node.meta``) -> ONNX ``metadata_props`` entries."""
    return {key: json.dumps({"v": ENCODING_VERSION, "data": _to_json(val)}, sort_keys=True)
            for key, val in iter_annotations(meta) if key not in _NOT_PORTABLE}


def decode(props: Mapping[str, str]) -> dict[str, Any]:
    """ONNX ``metadata_props`` -> annotations.

    Keys outside the ``adatsq.`` namespace are ignored. A key inside it that this adatsq does not
    know, or a payload of the wrong shape or version, is a ValueError naming the key.
    """
    out: dict[str, Any] = {}
    for key, text in props.items():
        if not key.startswith(NAMESPACE):
            continue
        if key not in _REGISTRY:
            raise ValueError(f"metadata_props[{key!r}]: unknown adatsq annotation (known: "
                             f"{', '.join(sorted(_REGISTRY))}); written by a newer adatsq?")
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"metadata_props[{key!r}] is not valid JSON: {exc}") from None
        if not isinstance(payload, dict) or "data" not in payload:
            raise ValueError(f"metadata_props[{key!r}] is not an adatsq annotation payload "
                             f"(expected {{'v': ..., 'data': ...}})")
        if payload.get("v") != ENCODING_VERSION:
            raise ValueError(f"metadata_props[{key!r}] has encoding version {payload.get('v')!r}, "
                             f"this adatsq reads version {ENCODING_VERSION}")
        try:
            out[key] = _from_json(_REGISTRY[key], payload["data"])
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"metadata_props[{key!r}] does not decode as {_REGISTRY[key].__name__}: {exc}") from None
    return out

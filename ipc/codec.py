"""Owns the wire encoding of messages: one frame = msgpack of [tag, {field: value}], nothing else.

No pickle and no msgpack extension types: a frame holds plain data only, and `decode` rebuilds the message
class from its tag and nested records (`TensorSpec`, ...) from the field annotations. Anything a peer can send
that is not a valid frame raises `ProtocolError` (never another exception), and unpacking is bounded by the
frame size. `decode(..., trusted=True)` (the control channel, after its handshake) builds the message without
the per-field checks: a structural decode, ~3x plain msgpack instead of ~5x.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

import msgpack

from ipc.errors import ProtocolError
from ipc.messages import MESSAGE_TYPES, SESSION_MESSAGES, Message, Record, field_types

MAX_FRAME_BYTES = 1 << 20  # control messages and token chunks are far smaller; a long prompt's ids fit


def encode(msg: Message, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Message -> frame; ProtocolError("oversized") rather than send what the peer would drop."""
    cls = type(msg)
    if MESSAGE_TYPES.get(getattr(cls, "TAG", None)) is not cls:
        raise TypeError(f"not a registered message: {cls.__name__}")
    if _has_records(cls):  # only the fields that may hold a record are walked (not a long prompt's ids: ~0.1 ms)
        fields = {name: _to_wire(getattr(msg, name)) if _holds_records(hint) else getattr(msg, name)
                  for name, hint in field_types(cls).items()}
    else:  # the per-step messages: their fields are plain values already
        fields = {name: getattr(msg, name) for name in field_types(cls)}
    try:
        data = msgpack.packb([cls.TAG, fields], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. an int over 64 bits
        raise ValueError(f"{cls.__name__} cannot be encoded: {exc}") from exc
    if len(data) > max_frame_bytes:
        raise ProtocolError("oversized", f"{cls.__name__} is {len(data)} bytes, limit {max_frame_bytes}")
    return data


def decode(data: bytes, *, max_frame_bytes: int = MAX_FRAME_BYTES, trusted: bool = False) -> Message:
    """Frame -> message, or ProtocolError with code malformed / unknown_type / oversized / bad_fields.

    `trusted`: the peer runs this same code and has passed the versioned handshake, so field types and
    values are not re-checked (the session messages, Handshake and Ready, always are)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("malformed", f"frame must be bytes, got {type(data).__name__}")
    if len(data) > max_frame_bytes:
        raise ProtocolError("oversized", f"frame is {len(data)} bytes, limit {max_frame_bytes}")
    tag, fields = _unpack_frame(data)
    cls = MESSAGE_TYPES.get(tag)
    if cls is None:
        raise ProtocolError("unknown_type", f"no message has tag {tag}")
    if trusted and cls not in SESSION_MESSAGES and not _has_records(cls):
        try:
            return cls(**fields)
        except TypeError as exc:  # unknown or missing fields
            raise ProtocolError("bad_fields", f"{cls.__name__}: {exc}") from None
    return _build(cls, fields)


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the protocol")


def _unpack_frame(data: bytes) -> tuple[int, dict]:
    # Length limits default to len(data), so a hostile header can't make msgpack allocate beyond the frame.
    try:
        frame = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext, timestamp=0
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError("malformed", f"not a msgpack frame ({type(exc).__name__}: {exc})") from None
    if not isinstance(frame, list) or len(frame) != 2:
        raise ProtocolError("malformed", "frame must be a 2-element array [tag, fields]")
    tag, fields = frame
    if not isinstance(tag, int) or isinstance(tag, bool):
        raise ProtocolError("malformed", f"tag must be an int, got {type(tag).__name__}")
    if not isinstance(fields, dict):
        raise ProtocolError("malformed", f"fields must be a map, got {type(fields).__name__}")
    return tag, fields


def _build(cls: type, fields: dict) -> Any:
    """Construct and validate `cls` (a message or a record) from wire fields; every failure is bad_fields."""
    hints = field_types(cls)
    if not hints.keys() >= fields.keys():
        unknown = sorted(str(k) for k in fields if k not in hints)
        raise ProtocolError("bad_fields", f"{cls.__name__} has no fields {unknown}")
    missing = sorted(_required(cls) - fields.keys())
    if missing:
        raise ProtocolError("bad_fields", f"{cls.__name__} is missing fields {missing}")
    try:
        nested = _record_fields(cls)
        built = cls(**({name: _from_wire(value, hints[name]) if name in nested else value
                        for name, value in fields.items()} if nested else fields))
        built.validate()
        return built
    except ValueError as exc:
        raise ProtocolError("bad_fields", str(exc)) from None


@functools.cache
def _required(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls) if _is_required(f))


@functools.cache
def _record_fields(cls: type) -> frozenset[str]:
    """The fields of `cls` whose values may hold records to rebuild (the rest pass through as decoded)."""
    return frozenset(name for name, hint in field_types(cls).items() if _holds_records(hint))


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@functools.cache
def _has_records(cls: type) -> bool:
    """Whether any field of `cls` may hold a record (a nested dataclass the codec must take apart)."""
    return any(_holds_records(hint) for hint in field_types(cls).values())


def _to_wire(value: Any) -> Any:
    if isinstance(value, Record):
        return {name: _to_wire(getattr(value, name)) for name in field_types(type(value))}
    if isinstance(value, dict):
        return {key: _to_wire(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_wire(item) for item in value]
    return value


@functools.cache
def _holds_records(hint: Any) -> bool:
    """Whether a value annotated `hint` may contain a record anywhere inside it."""
    if isinstance(hint, type) and issubclass(hint, Record):
        return True
    return any(_holds_records(arg) for arg in typing.get_args(hint))


def _from_wire(value: Any, hint: Any) -> Any:
    """Rebuild the records the annotation asks for; all other values pass through to validation."""
    if not _holds_records(hint):  # ids, text, params: nothing to rebuild (and no walk over a long prompt's ids)
        return value
    if isinstance(hint, type) and issubclass(hint, Record):
        if not isinstance(value, dict):
            raise ValueError(f"{hint.__name__} must be a map, got {type(value).__name__}")
        return _build(hint, value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict and isinstance(value, dict):
        return {key: _from_wire(item, args[1]) for key, item in value.items()}
    if origin is list and isinstance(value, list):
        return [_from_wire(item, args[0]) for item in value]
    if value is not None and type(None) in args:  # X | None
        arms = [arm for arm in args if arm is not type(None)]
        return _from_wire(value, arms[0]) if len(arms) == 1 else value
    return value


def _resolve_all() -> None:
    """Resolve every message's and record's annotations now, at import: `typing.get_type_hints` on first use cost
    ~0.3-1 ms per class, which landed in a process's first request (its first encode and decode of each kind)."""
    pending, seen = list(MESSAGE_TYPES.values()), set()
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for hint in field_types(cls).values():
            _holds_records(hint)
            pending += [arg for arg in (hint, *typing.get_args(hint))
                        if isinstance(arg, type) and issubclass(arg, Record)]
        _has_records(cls)


_resolve_all()

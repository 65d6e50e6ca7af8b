"""Hypothesis strategies for every icegate.v1 request, built from the generated descriptors.

A field added to a proto is generated at once, without touching a test: `RequestStrategies`
walks a message's descriptor and draws any subset of its fields, each set to any value of its
type, with the edges that matter (integer limits, control characters, strings past grpc's
64 KiB message limit, empty sub-messages that are still "set"). The string hints steer
examples past the first checks (a known project, a provider name, a field's own name), so
deeper validation is reached too; a test adds its own (its project ids, its keys).

    strategies = RequestStrategies(extra_hints=["my-project"])
    @given(request=strategies.message(method.input_type))

`field_paths`, `replace_field` and `RequestStrategies.one_field` change one field, at any
depth, of a request that is otherwise valid.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor, message_factory
from hypothesis import strategies as st

from icegate.v1 import admin_pb2, credentials_pb2, sessions_pb2, usage_pb2

FD = descriptor.FieldDescriptor
FieldPath = tuple[descriptor.FieldDescriptor, ...]

_MODULES = (credentials_pb2, sessions_pb2, usage_pb2, admin_pb2)

METHODS: list[descriptor.MethodDescriptor] = [
    method
    for module in _MODULES
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
"""Every RPC of every icegate.v1 service, from the generated descriptors."""


def method_path(method: descriptor.MethodDescriptor) -> str:
    """The method's gRPC path, `/icegate.v1.<Service>/<Method>` (also a readable test id)."""
    return f"/{method.containing_service.full_name}/{method.name}"


ALL_FIELD_NAMES = sorted({
    field.name
    for module in _MODULES
    for message in module.DESCRIPTOR.message_types_by_name.values()
    for field in message.fields
})
"""The name of every field of every icegate.v1 message (update masks name them)."""

PROVIDER_NAMES = ("openai", "azure", "orga", "gemini")

STRING_HINTS = (
    "", "default", "alice", "a", "a:b", ":", " ", "\x00", "é", "😀",
    *PROVIDER_NAMES, "openai-beta", "echo", "alloy", "nobody", "gpt-realtime",
    "gpt-realtime-mini", "gpt-4o-realtime-preview", "audio", "text", "dev@example.test",
    "https://example.com/up", "javascript:alert(1)", "ses_0000000000000000", "igk_x_y",
    "bmV4dA==", "free",
)
"""Values that get past the first checks of some field, so deeper validation is reached."""

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1), FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}
_INT_HINTS = [0, 1, -1, 5, 10, 59, 60, 120, 600, 3600, 7200, 86400, 7 * 86400 + 1, 10**6,
              10**9, 10**9 + 1, 315_576_000_000, 315_576_000_001, 999_999_999, 1_000_000_000]

_unicode = st.characters(exclude_categories=("Cs",))  # protobuf strings cannot hold surrogates
_hostile = st.sampled_from(list(":\x00\x01\n\r\t\x1b\x7f\x85/\\%' é😀\u202e\ufeff\u200b\ufffd"))


def _integers(field_type: int) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[field_type]
    edges = sorted({v for v in (*_INT_HINTS, *(-v for v in _INT_HINTS), low, high)
                    if low <= v <= high})
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


class RequestStrategies:
    """Strategies for icegate.v1 messages, whose strings lean on the given hints.

    Args:
        extra_hints: Strings worth trying in any string field besides `STRING_HINTS` and
            every field name: the test's project ids, keys, and so on.
    """

    def __init__(self, extra_hints: Iterable[str] = ()) -> None:
        self.string_hints = [*STRING_HINTS, *extra_hints, *ALL_FIELD_NAMES]
        hints = st.sampled_from(self.string_hints)
        self.short_text = st.one_of(
            st.sampled_from(["", "default"]),
            hints,
            st.text(_unicode, max_size=40),
            st.text(st.one_of(_hostile, _unicode), max_size=300),
            st.builds(lambda hint, tail: hint + tail, hints,
                      st.text(_hostile, min_size=1, max_size=3)),
            st.builds(lambda head, hint: head + hint, st.text(_hostile, min_size=1, max_size=3),
                      hints),
        )
        """Strings of up to 300 characters, hints and hostile characters mixed in."""
        self.huge_text = st.builds(lambda piece, size: (piece * size)[:size],
                                   st.text(_unicode, min_size=1, max_size=8),
                                   st.integers(300, 64 * 1024))
        """Up to 64 Ki characters; past 64 KiB of message, grpc refuses it before icegate
        sees it."""
        self.text = st.one_of(self.short_text, self.short_text, self.short_text, self.huge_text)

    def message(self, message: descriptor.Descriptor,
                depth: int = 0) -> st.SearchStrategy[Any]:
        """Messages of type `message`, any subset of fields set, each to any value of its
        type (sub-messages likewise, down to a depth of 4)."""
        message_class = message_factory.GetMessageClass(message)
        if depth > 4:
            return st.just(message_class())
        optional = {field.name: self.field(field, depth) for field in message.fields}
        return st.fixed_dictionaries({}, optional=optional).map(
            lambda values: build_message(message_class, values))

    def field(self, field: descriptor.FieldDescriptor, depth: int = 0) -> st.SearchStrategy[Any]:
        """Any value of `field`, in the form `set_fields` takes: a dict for a map, a list for
        a repeated field (a few long values, or many short ones)."""
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = self._value(field.message_type.fields_by_name["key"], depth)
            value = self._value(field.message_type.fields_by_name["value"], depth)
            return st.dictionaries(key, value, max_size=20)
        if field.is_repeated:
            many = 30 if field.message_type is not None else 300
            return st.one_of(st.lists(self._value(field, depth), max_size=4),
                             st.lists(self._value(field, depth, short=True), min_size=20,
                                      max_size=many))
        return self._value(field, depth)

    def one_field(self, method: descriptor.MethodDescriptor) -> st.SearchStrategy[Any]:
        """(path, value): one field, anywhere in `method`'s request, and any value of its
        type; None when the request has no field."""
        paths = field_paths(method.input_type)
        if not paths:
            return st.just(None)
        return st.sampled_from(paths).flatmap(
            lambda path: st.tuples(st.just(path), self.field(path[-1], len(path))))

    def _value(self, field: descriptor.FieldDescriptor, depth: int, *,
               short: bool = False) -> st.SearchStrategy[Any]:
        if field.message_type is not None:
            return self.message(field.message_type, depth + 1)
        return self._scalar(field, short=short)

    def _scalar(self, field: descriptor.FieldDescriptor, *,
                short: bool) -> st.SearchStrategy[Any]:
        if field.type in _INT_RANGES:
            return _integers(field.type)
        if field.type == FD.TYPE_ENUM:  # proto3 enums are open: any int32 goes on the wire
            defined = [value.number for value in field.enum_type.values]
            return st.one_of(st.sampled_from(defined), st.integers(-(2**31), 2**31 - 1))
        if field.type == FD.TYPE_DOUBLE:
            return st.one_of(st.sampled_from([0.0, -0.0, 0.25, 0.6, 1.0, 1.5, 2.0, 1e308]),
                             st.floats(allow_nan=True, allow_infinity=True))
        if field.type == FD.TYPE_FLOAT:
            return st.floats(width=32, allow_nan=True, allow_infinity=True)
        if field.type == FD.TYPE_BOOL:
            return st.booleans()
        if field.type == FD.TYPE_STRING:
            return self.short_text if short else self.text
        if field.type == FD.TYPE_BYTES:
            return st.binary(max_size=64) if short else st.one_of(
                st.binary(max_size=64), st.binary(min_size=1000, max_size=70_000))
        raise NotImplementedError(f"{field.full_name}: field type {field.type}")


def build_message(message_class: Any, values: dict[str, Any]) -> Any:
    """A new `message_class` with `values` set (see `set_fields`)."""
    message = message_class()
    set_fields(message, values)
    return message


def set_fields(message: Any, values: dict[str, Any]) -> None:
    """Sets each named field of `message`: maps from a dict, repeated fields from a list,
    sub-messages by copy (an empty one is still set)."""
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name) if field.message_type is not None else None
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for k, v in value.items():
                if value_field.message_type is not None:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.is_repeated:
            getattr(message, name).extend(value)
        elif target is not None:
            target.CopyFrom(value)
            target.SetInParent()  # an empty sub-message is still "set"
        else:
            setattr(message, name, value)


def field_paths(message: descriptor.Descriptor, depth: int = 0) -> list[FieldPath]:
    """Every field of `message` and, a few levels down, of its sub-messages, as paths."""
    paths: list[FieldPath] = []
    for field in message.fields:
        paths.append((field,))
        if field.message_type is not None and not field.is_repeated and depth < 2:
            paths.extend((field, *rest) for rest in field_paths(field.message_type, depth + 1))
    return paths


def replace_field(message: Any, path: FieldPath, value: Any) -> None:
    """Sets the field at `path` in `message` to `value` alone (what it held is cleared)."""
    for field in path[:-1]:
        message = getattr(message, field.name)
    last = path[-1]
    message.ClearField(last.name)
    set_fields(message, {last.name: value})


def is_set(message: Any, path: FieldPath) -> bool:
    """Whether the field at `path` holds something a server would see."""
    for field in path[:-1]:
        if not message.HasField(field.name):
            return False
        message = getattr(message, field.name)
    last = path[-1]
    if last.is_repeated:
        return len(getattr(message, last.name)) > 0
    if last.has_presence:
        return bool(message.HasField(last.name))
    return bool(getattr(message, last.name) != last.default_value)

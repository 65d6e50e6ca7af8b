"""ErrorInfo reasons: the `ErrorReason` enum of the contract and the strings on the wire.

ErrorInfo.reason carries a value's name without the enum's prefix, as AIP-193 spells reasons:
`ERROR_REASON_RATE_LIMITED` travels as `RATE_LIMITED`. icegate's server writes reasons and
this client reads them through these two functions only, so no reason is spelled anywhere but
in `protos/icegate/v1/errors.proto`.
"""

from __future__ import annotations

from icegate.v1.errors_pb2 import ErrorReason

_PREFIX = "ERROR_REASON_"

_WIRE: dict[ErrorReason.ValueType, str] = {
    value: name.removeprefix(_PREFIX) for name, value in ErrorReason.items()
    if value != ErrorReason.ERROR_REASON_UNSPECIFIED
}
_BY_WIRE: dict[str, ErrorReason.ValueType] = {wire: value for value, wire in _WIRE.items()}


def wire_reason(reason: ErrorReason.ValueType) -> str:
    """The ErrorInfo.reason string for `reason` (`RATE_LIMITED` for ERROR_REASON_RATE_LIMITED).

    Raises:
        ValueError: `reason` is ERROR_REASON_UNSPECIFIED or not a value of ErrorReason.
    """
    try:
        return _WIRE[reason]
    except KeyError:
        raise ValueError(f"{reason!r} is not a reason icegate sends") from None


def reason_from_wire(wire: str) -> ErrorReason.ValueType:
    """The ErrorReason an ErrorInfo.reason names; ERROR_REASON_UNSPECIFIED if empty or unknown."""
    return _BY_WIRE.get(wire, ErrorReason.ERROR_REASON_UNSPECIFIED)

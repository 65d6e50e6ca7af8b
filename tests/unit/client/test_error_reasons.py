"""ErrorReason values <-> ErrorInfo.reason strings: the one mapping server and client share."""

from __future__ import annotations

import pytest

from icegate.error_reasons import reason_from_wire, wire_reason
from icegate.v1.errors_pb2 import ErrorReason

SENT = [value for value in ErrorReason.values() if value != ErrorReason.ERROR_REASON_UNSPECIFIED]


def test_wire_reason_drops_the_enum_prefix():
    assert wire_reason(ErrorReason.ERROR_REASON_RATE_LIMITED) == "RATE_LIMITED"
    assert wire_reason(ErrorReason.ERROR_REASON_UPSTREAM_QUOTA_EXCEEDED) == (
        "UPSTREAM_QUOTA_EXCEEDED")


@pytest.mark.parametrize("value", SENT, ids=ErrorReason.Name)
def test_every_reason_reads_back_as_itself(value):
    wire = wire_reason(value)
    assert ErrorReason.Name(value) == f"ERROR_REASON_{wire}"
    assert reason_from_wire(wire) == value


def test_unspecified_is_never_sent():
    with pytest.raises(ValueError, match="not a reason icegate sends"):
        wire_reason(ErrorReason.ERROR_REASON_UNSPECIFIED)
    with pytest.raises(ValueError, match="not a reason icegate sends"):
        wire_reason(max(ErrorReason.values()) + 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("wire", [
    "", "UNSPECIFIED", "ERROR_REASON_RATE_LIMITED", "rate_limited", "RATE_LIMITED ",
    "A_REASON_FROM_A_NEWER_SERVER"])
def test_an_empty_or_unknown_reason_reads_as_unspecified(wire):
    assert reason_from_wire(wire) == ErrorReason.ERROR_REASON_UNSPECIFIED


def test_a_raised_error_names_its_reason_as_the_contract_enum():
    """A caller can switch on `icegate.ErrorReason` instead of comparing strings."""
    import grpc

    import icegate

    limited = icegate.RateLimitedError("slow down", code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       reason="RATE_LIMITED")
    assert limited.error_reason == icegate.ErrorReason.ERROR_REASON_RATE_LIMITED
    unknown = icegate.IcegateError("?", reason="SOMETHING_NEW")
    assert unknown.error_reason == icegate.ErrorReason.ERROR_REASON_UNSPECIFIED

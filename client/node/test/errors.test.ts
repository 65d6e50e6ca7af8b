/** The typed errors match the Python client's, reason by reason and code by code. */

import { create, type DescMessage, type MessageInitShape } from "@bufbuild/protobuf";
import { DurationSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  ERROR_CLASS_BY_REASON,
  ErrorMetadata,
  ErrorReason,
  IcegateError,
  InternalError,
  QuotaExceededError,
  RateLimitedError,
  reasonFromWire,
  statusName,
  toIcegateError,
  TurnByteQuotaExceededError,
  UpstreamTimeoutError,
  UpstreamUnavailableError,
  wireReason,
} from "@icegate/client";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  QuotaFailureSchema,
  RetryInfoSchema,
} from "../src/gen/google/rpc/error_details_pb.js";
import { env } from "./environment.js";

function detail<Desc extends DescMessage>(desc: Desc, value: MessageInitShape<Desc>) {
  return { desc, value };
}

/** A failure as connect-node hands it over from either transport: code, message, decoded details. */
function failure(code: Code, reason: string, metadata: Record<string, string> = {}, extra: ReturnType<typeof detail>[] = []) {
  return new ConnectError("refused", code, undefined, [detail(ErrorInfoSchema, { reason, domain: "icegate.dev", metadata }), ...extra]);
}

function lineage(error: IcegateError): string[] {
  const names: string[] = [];
  for (let proto = Object.getPrototypeOf(error); proto && proto !== Error.prototype; proto = Object.getPrototypeOf(proto)) {
    const name = proto.constructor.name as string;
    if (name !== "WithUpstreamDetails") names.push(name);
  }
  return names;
}

const CODE_OF_STATUS: Record<string, Code> = Object.fromEntries(
  Object.values(Code)
    .filter((value): value is Code => typeof value === "number")
    .map((code) => [statusName(code), code]),
);

describe("typed errors", () => {
  test("every reason the Python client knows gives the class of the same name and ancestry", () => {
    const python = env.python.byReason;
    assert.ok(Object.keys(python).length >= 23);
    for (const [wire, expected] of Object.entries(python)) {
      const reason = reasonFromWire(wire);
      assert.notEqual(reason, ErrorReason.UNSPECIFIED, wire);
      const code = expected.includes("ResourceExhaustedError") ? Code.ResourceExhausted : Code.FailedPrecondition;
      const error = toIcegateError(failure(code, wire));
      assert.deepEqual(lineage(error), expected, wire);
      assert.equal(error.reason, wire);
      assert.equal(error.errorReason, reason);
      assert.equal(wireReason(reason as Exclude<ErrorReason, ErrorReason.UNSPECIFIED>), wire);
    }
    // ... and no reason the Node client maps that the Python one does not.
    const node = Object.keys(ERROR_CLASS_BY_REASON).map((value) => ErrorReason[Number(value)]);
    assert.deepEqual(node.sort(), Object.keys(python).sort());
  });

  test("without a known reason the class follows the status code, as in Python", () => {
    for (const [status, expected] of Object.entries(env.python.byCode)) {
      const code = CODE_OF_STATUS[status];
      assert.ok(code !== undefined, status);
      for (const reason of ["", "SOMETHING_NEW", "rate_limited", "__proto__", "constructor"]) {
        const error = toIcegateError(failure(code, reason));
        assert.deepEqual(lineage(error), expected, `${status} ${reason}`);
        assert.equal(error.errorReason, ErrorReason.UNSPECIFIED);
      }
    }
    assert.ok(toIcegateError(new ConnectError("?", Code.DataLoss)) instanceof InternalError);
    assert.ok(toIcegateError(new Error("socket hang up")) instanceof InternalError);
  });

  test("UPSTREAM_UNAVAILABLE past the deadline is an UpstreamTimeoutError", () => {
    const timeout = toIcegateError(failure(Code.DeadlineExceeded, "UPSTREAM_UNAVAILABLE", { provider: "openai", upstream_status: "0" }));
    assert.deepEqual(lineage(timeout), env.python.upstreamTimeout);
    assert.ok(timeout instanceof UpstreamTimeoutError && timeout.provider === "openai" && timeout.upstreamStatus === 0);
    const down = toIcegateError(
      failure(Code.Unavailable, "UPSTREAM_UNAVAILABLE", { provider: "openai", upstream_status: "503", upstream_request_id: "req_1" }, [
        detail(RetryInfoSchema, { retryDelay: create(DurationSchema, { seconds: 2n, nanos: 500_000_000 }) }),
      ]),
    );
    assert.ok(down instanceof UpstreamUnavailableError);
    assert.deepEqual([down.upstreamStatus, down.upstreamRequestId, down.retryAfterMs], [503, "req_1", 2500]);
  });

  test("the metadata keys are spelled as the Python client spells them", () => {
    assert.deepEqual({ ...ErrorMetadata }, env.python.errorMetadata);
  });

  test("rich details become typed attributes; malformed metadata does not", () => {
    const quota = toIcegateError(
      failure(
        Code.ResourceExhausted,
        "TURN_BYTE_QUOTA_EXCEEDED",
        { bytes_used: "1048576", byte_quota: "1000000", plan: "free", upgrade_url: "https://x.test/up", resets_at: "2026-12-01T00:00:00+00:00" },
        [detail(QuotaFailureSchema, { violations: [{ subject: "project:p", description: "monthly TURN bytes" }] })],
      ),
    );
    assert.ok(quota instanceof TurnByteQuotaExceededError);
    assert.deepEqual([quota.bytesUsed, quota.byteQuota, quota.plan, quota.upgradeUrl], [1048576, 1000000, "free", "https://x.test/up"]);
    assert.equal(quota.resetsAt?.toISOString(), "2026-12-01T00:00:00.000Z");
    assert.deepEqual(quota.quotaViolations, [{ subject: "project:p", description: "monthly TURN bytes" }]);

    const odd = toIcegateError(
      failure(Code.ResourceExhausted, "QUOTA_EXCEEDED", { sessions_used: "12abc", sessions_included: "1e3", resets_at: "soon" }),
    );
    assert.ok(odd instanceof QuotaExceededError);
    assert.deepEqual([odd.usage.sessionsUsed, odd.usage.sessionsIncluded, odd.resetsAt], [0, 0, undefined]);

    const limited = toIcegateError(failure(Code.ResourceExhausted, "RATE_LIMITED"));
    assert.ok(limited instanceof RateLimitedError);
    assert.deepEqual([limited.limit, limited.retryAfterMs, limited.resetAt], [undefined, undefined, undefined]);
  });

  test("an undecodable detail is left out, the rest kept", () => {
    const error = new ConnectError("bad", Code.InvalidArgument);
    error.details.push({ type: "google.rpc.BadRequest", value: new Uint8Array([0xff, 0xff, 0xff]) });
    error.details.push({ type: "google.rpc.BadRequest", value: new Uint8Array() });
    const typed = toIcegateError(error);
    assert.equal(typed.details.length, 1);
    assert.ok(typed.details.every((d) => d.$typeName === BadRequestSchema.typeName));
    assert.equal(typed.toString(), "INVALID_ARGUMENT: bad");
  });
});

/**
 * The errors the icegate client throws: one class per situation a caller handles differently,
 * the same tree as the Python client's `icegate.errors`.
 *
 *     IcegateError
 *     ├── AuthenticationError          UNAUTHENTICATED (INVALID_API_KEY)
 *     ├── PermissionDeniedError        PERMISSION_DENIED
 *     │   ├── ProjectForbiddenError        PROJECT_FORBIDDEN
 *     │   ├── SessionPolicyError           SESSION_POLICY (.field)
 *     │   └── TurnCredentialsRevokedError  TURN_CREDENTIALS_REVOKED (.revokedUntil)
 *     ├── InvalidArgumentError         INVALID_ARGUMENT (INVALID_FIELD; .fieldViolations)
 *     ├── NotFoundError                NOT_FOUND
 *     ├── AlreadyExistsError           ALREADY_EXISTS
 *     ├── ResourceExhaustedError       RESOURCE_EXHAUSTED (.quotaViolations)
 *     │   ├── RateLimitedError             RATE_LIMITED (.resetAt, .retryAfterMs, .limit)
 *     │   ├── QuotaExceededError           QUOTA_EXCEEDED (.usage, .upgradeUrl, .plan, .resetsAt)
 *     │   ├── ConcurrentLimitError         CONCURRENT_LIMIT (.current, .maxSessions)
 *     │   ├── TurnAllocationLimitError     TURN_ALLOCATION_LIMIT (.current, .maxAllocations)
 *     │   ├── TurnByteQuotaExceededError   TURN_BYTE_QUOTA_EXCEEDED (.bytesUsed, .byteQuota, ...)
 *     │   └── UpstreamQuotaError           UPSTREAM_QUOTA_EXCEEDED
 *     ├── FailedPreconditionError      FAILED_PRECONDITION
 *     │   ├── UpstreamNotConfiguredError   UPSTREAM_NOT_CONFIGURED
 *     │   ├── UpstreamAuthFailedError      UPSTREAM_AUTH_FAILED (.provider, .upstreamRequestId)
 *     │   ├── UpstreamRejectedError        UPSTREAM_REJECTED
 *     │   ├── CoturnOutOfStepError         COTURN_OUT_OF_STEP
 *     │   └── CoturnCliNotConfiguredError  COTURN_CLI_NOT_CONFIGURED
 *     ├── UnavailableError             UNAVAILABLE (safe to retry; .retryAfterMs)
 *     │   ├── UpstreamUnavailableError     UPSTREAM_UNAVAILABLE
 *     │   └── CoturnCliUnavailableError    COTURN_CLI_UNAVAILABLE
 *     ├── DeadlineExceededError        DEADLINE_EXCEEDED
 *     │   └── UpstreamTimeoutError         UPSTREAM_UNAVAILABLE within the deadline
 *     ├── CancelledError               CANCELLED
 *     └── InternalError                INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED ...
 *
 * `toIcegateError` is the one place a failed call becomes one of these, whichever transport
 * carried it: connect-node decodes the rich status into `ConnectError.details` from the
 * `grpc-status-details-bin` trailer on gRPC and from the error body's details on Connect, and
 * the class is chosen by the ErrorInfo reason (the `ErrorReason` enum generated from
 * protos/icegate/v1/errors.proto) where icegate sent one, else by the status code.
 */

import { createRegistry, isMessage, type Message } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  HelpSchema,
  QuotaFailureSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";
import { ErrorReason } from "./gen/icegate/v1/errors_pb.js";
import { ErrorMetadata } from "./errorMetadata.js";

/** One bad request field, as the server described it. */
export interface FieldViolation {
  readonly field: string;
  readonly description: string;
}

/** One limit a QuotaFailure detail names. */
export interface QuotaViolation {
  readonly subject: string;
  readonly description: string;
}

/** A project's monthly session quota at the moment it ran out. */
export interface QuotaUsage {
  readonly plan: string;
  readonly sessionsIncluded: number;
  readonly sessionsUsed: number;
  readonly sessionsRemaining: number;
}

/** The status code's gRPC spelling (`RESOURCE_EXHAUSTED`, `CANCELLED`), as the Python client shows it. */
export function statusName(code: Code): string {
  if (code === Code.Canceled) return "CANCELLED";
  const name = Code[code];
  return name === undefined ? "UNKNOWN" : name.replace(/(?<=[a-z])(?=[A-Z])/g, "_").toUpperCase();
}

const INTEGER = /^-?[0-9]{1,16}$/;

/** Base of every error the client throws; carries the status and the rich details of the answer. */
export class IcegateError extends Error {
  /** The status code (the gRPC numbering, also Connect's). */
  readonly code: Code;
  /** The ErrorInfo reason as sent (`RATE_LIMITED`); empty when the answer named none. */
  readonly reason: string;
  /** ErrorInfo metadata (keys in `ErrorMetadata`). */
  readonly metadata: Readonly<Record<string, string>>;
  /** The decoded detail messages icegate sends (ErrorInfo, BadRequest, RetryInfo, QuotaFailure, Help). */
  readonly details: readonly Message[];

  constructor(
    message: string,
    options: {
      code?: Code;
      reason?: string;
      metadata?: Record<string, string>;
      details?: readonly Message[];
      cause?: unknown;
    } = {},
  ) {
    super(message, { cause: options.cause });
    this.name = new.target.name;
    this.code = options.code ?? Code.Unknown;
    this.reason = options.reason ?? "";
    this.metadata = Object.freeze({ ...options.metadata });
    this.details = Object.freeze([...(options.details ?? [])]);
  }

  /** `reason` as the contract's `ErrorReason` (UNSPECIFIED when none, or one this client does not know). */
  get errorReason(): ErrorReason {
    return reasonFromWire(this.reason);
  }

  /** The status code's gRPC name, e.g. `RESOURCE_EXHAUSTED`. */
  get codeName(): string {
    return statusName(this.code);
  }

  override toString(): string {
    return `${this.codeName}${this.reason ? ` ${this.reason}` : ""}: ${this.message}`;
  }
}

function text(error: IcegateError, key: string): string {
  return error.metadata[key] ?? "";
}

function integer(error: IcegateError, key: string): number {
  const value = error.metadata[key];
  return value !== undefined && INTEGER.test(value) ? Number(value) : 0;
}

function time(error: IcegateError, key: string): Date | undefined {
  const value = error.metadata[key];
  if (!value) return undefined;
  const parsed = new Date(value);
  return Number.isNaN(parsed.getTime()) ? undefined : parsed;
}

/** RetryInfo's delay, in milliseconds. */
function retryDelayMs(error: IcegateError): number | undefined {
  for (const detail of error.details) {
    if (isMessage(detail, RetryInfoSchema) && detail.retryDelay) {
      return Number(detail.retryDelay.seconds) * 1000 + Math.round(detail.retryDelay.nanos / 1e6);
    }
  }
  return undefined;
}

/** The server did not accept the API key (missing, malformed, unknown or revoked). */
export class AuthenticationError extends IcegateError {}

/** The key is valid but may not do this. */
export class PermissionDeniedError extends IcegateError {}

/** The key is valid but not for the project the call names. */
export class ProjectForbiddenError extends PermissionDeniedError {}

/** An option lies outside the project's session policy; `field` names it. */
export class SessionPolicyError extends PermissionDeniedError {
  get field(): string {
    return text(this, ErrorMetadata.FIELD);
  }
}

/** TURN credentials for this user or session were revoked; refused until `revokedUntil`. */
export class TurnCredentialsRevokedError extends PermissionDeniedError {
  get revokedUntil(): Date | undefined {
    return time(this, ErrorMetadata.REVOKED_UNTIL);
  }
}

/** A request field is invalid; `fieldViolations` says which and why. */
export class InvalidArgumentError extends IcegateError {
  get fieldViolations(): FieldViolation[] {
    return this.details.flatMap((detail) =>
      isMessage(detail, BadRequestSchema)
        ? detail.fieldViolations.map((v) => ({ field: v.field, description: v.description }))
        : [],
    );
  }
}

/** The named project, key or session does not exist. */
export class NotFoundError extends IcegateError {}

/** A resource with that identity exists already. */
export class AlreadyExistsError extends IcegateError {}

/** A limit was reached; `quotaViolations` lists the limits a QuotaFailure detail names. */
export class ResourceExhaustedError extends IcegateError {
  get quotaViolations(): QuotaViolation[] {
    return this.details.flatMap((detail) =>
      isMessage(detail, QuotaFailureSchema)
        ? detail.violations.map((v) => ({ subject: v.subject, description: v.description }))
        : [],
    );
  }
}

/** The project used its requests for the current window; retry at `resetAt`. */
export class RateLimitedError extends ResourceExhaustedError {
  get resetAt(): Date | undefined {
    return time(this, ErrorMetadata.RESET_AT);
  }

  /** RetryInfo's delay, in milliseconds. */
  get retryAfterMs(): number | undefined {
    return retryDelayMs(this);
  }

  get limit(): number | undefined {
    return this.metadata[ErrorMetadata.LIMIT] === undefined ? undefined : integer(this, ErrorMetadata.LIMIT);
  }
}

/** The project created every session its plan includes this month. */
export class QuotaExceededError extends ResourceExhaustedError {
  get usage(): QuotaUsage {
    return {
      plan: this.plan,
      sessionsIncluded: integer(this, ErrorMetadata.SESSIONS_INCLUDED),
      sessionsUsed: integer(this, ErrorMetadata.SESSIONS_USED),
      sessionsRemaining: integer(this, ErrorMetadata.SESSIONS_REMAINING),
    };
  }

  get plan(): string {
    return text(this, ErrorMetadata.PLAN);
  }

  get upgradeUrl(): string {
    return text(this, ErrorMetadata.UPGRADE_URL);
  }

  get resetsAt(): Date | undefined {
    return time(this, ErrorMetadata.RESETS_AT);
  }
}

/** The project holds as many live sessions as it may; end one first. */
export class ConcurrentLimitError extends ResourceExhaustedError {
  get current(): number {
    return integer(this, ErrorMetadata.CURRENT);
  }

  get maxSessions(): number {
    return integer(this, ErrorMetadata.MAX);
  }
}

/** The project holds as many live TURN allocations as it may; wait for some to end. */
export class TurnAllocationLimitError extends ResourceExhaustedError {
  get current(): number {
    return integer(this, ErrorMetadata.CURRENT);
  }

  get maxAllocations(): number {
    return integer(this, ErrorMetadata.MAX);
  }
}

/** The project's TURN allocations relayed every byte its plan includes this month. */
export class TurnByteQuotaExceededError extends ResourceExhaustedError {
  get bytesUsed(): number {
    return integer(this, ErrorMetadata.BYTES_USED);
  }

  get byteQuota(): number {
    return integer(this, ErrorMetadata.BYTE_QUOTA);
  }

  get plan(): string {
    return text(this, ErrorMetadata.PLAN);
  }

  get upgradeUrl(): string {
    return text(this, ErrorMetadata.UPGRADE_URL);
  }

  get resetsAt(): Date | undefined {
    return time(this, ErrorMetadata.RESETS_AT);
  }
}

/** What the server says about a failed upstream provider call. */
export interface UpstreamDetails {
  /** The provider's short name (`openai`, ...). */
  readonly provider: string;
  /** The HTTP status the provider answered; 0 when no answer came (or none was asked). */
  readonly upstreamStatus: number;
  /** The provider's request id, when it sent one. */
  readonly upstreamRequestId: string;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type ErrorClass<T extends IcegateError = IcegateError> = abstract new (...args: any[]) => T;

/** The upstream provider's details as getters on a subclass of `Base` (the classes have two parents in Python). */
function withUpstreamDetails<Base extends ErrorClass>(base: Base) {
  abstract class WithUpstreamDetails extends base implements UpstreamDetails {
    get provider(): string {
      return text(this, ErrorMetadata.PROVIDER);
    }

    get upstreamStatus(): number {
      return integer(this, ErrorMetadata.UPSTREAM_STATUS);
    }

    get upstreamRequestId(): string {
      return text(this, ErrorMetadata.UPSTREAM_REQUEST_ID);
    }
  }
  return WithUpstreamDetails;
}

/** The provider account behind the project is out of quota or credit. */
export class UpstreamQuotaError extends withUpstreamDetails(ResourceExhaustedError) {}

/** The system is not in a state where the call can succeed; fix it before retrying. */
export class FailedPreconditionError extends IcegateError {}

/** The project has no key for the provider it asked for. */
export class UpstreamNotConfiguredError extends withUpstreamDetails(FailedPreconditionError) {}

/** The provider refused the project's key. */
export class UpstreamAuthFailedError extends withUpstreamDetails(FailedPreconditionError) {}

/** The provider refused the request itself. */
export class UpstreamRejectedError extends withUpstreamDetails(FailedPreconditionError) {}

/** A TURN secret rotation refused: icegate keeps no coturn database coturn would follow. */
export class CoturnOutOfStepError extends FailedPreconditionError {}

/** Ending TURN allocations needs coturn's admin CLI, which the server has not configured. */
export class CoturnCliNotConfiguredError extends FailedPreconditionError {}

/** The server or something it depends on is unavailable; safe to retry with backoff. */
export class UnavailableError extends IcegateError {
  /** RetryInfo's delay, in milliseconds, when the server gave one. */
  get retryAfterMs(): number | undefined {
    return retryDelayMs(this);
  }
}

/** coturn's admin CLI could not be used to end allocations; safe to retry. */
export class CoturnCliUnavailableError extends UnavailableError {}

/** The provider was down, slow or failing. */
export class UpstreamUnavailableError extends withUpstreamDetails(UnavailableError) {}

/** The call did not finish before its deadline. */
export class DeadlineExceededError extends IcegateError {}

/** The provider did not answer in time. */
export class UpstreamTimeoutError extends withUpstreamDetails(DeadlineExceededError) {}

/** The call was cancelled. */
export class CancelledError extends IcegateError {}

/** The server failed in a way it does not explain (a bug, or an unknown status). */
export class InternalError extends IcegateError {}

type ConcreteErrorClass = new (message: string, options?: ConstructorParameters<typeof IcegateError>[1]) => IcegateError;

/**
 * The class for each reason icegate sends. Typed over every value of the generated enum, so a
 * reason added to errors.proto does not compile until it has its class here.
 */
export const ERROR_CLASS_BY_REASON: Readonly<Record<Exclude<ErrorReason, ErrorReason.UNSPECIFIED>, ConcreteErrorClass>> = {
  [ErrorReason.INVALID_FIELD]: InvalidArgumentError,
  [ErrorReason.MALFORMED_REQUEST]: InvalidArgumentError,
  [ErrorReason.INVALID_API_KEY]: AuthenticationError,
  [ErrorReason.PROJECT_FORBIDDEN]: ProjectForbiddenError,
  [ErrorReason.NOT_FOUND]: NotFoundError,
  [ErrorReason.ALREADY_EXISTS]: AlreadyExistsError,
  [ErrorReason.RATE_LIMITED]: RateLimitedError,
  [ErrorReason.QUOTA_EXCEEDED]: QuotaExceededError,
  [ErrorReason.CONCURRENT_LIMIT]: ConcurrentLimitError,
  [ErrorReason.STORE_UNAVAILABLE]: UnavailableError,
  [ErrorReason.COTURN_OUT_OF_STEP]: CoturnOutOfStepError,
  [ErrorReason.UPSTREAM_NOT_CONFIGURED]: UpstreamNotConfiguredError,
  [ErrorReason.UPSTREAM_AUTH_FAILED]: UpstreamAuthFailedError,
  [ErrorReason.UPSTREAM_REJECTED]: UpstreamRejectedError,
  [ErrorReason.UPSTREAM_QUOTA_EXCEEDED]: UpstreamQuotaError,
  [ErrorReason.UPSTREAM_UNAVAILABLE]: UpstreamUnavailableError,
  [ErrorReason.INTERNAL]: InternalError,
  [ErrorReason.SESSION_POLICY]: SessionPolicyError,
  [ErrorReason.TURN_ALLOCATION_LIMIT]: TurnAllocationLimitError,
  [ErrorReason.TURN_BYTE_QUOTA_EXCEEDED]: TurnByteQuotaExceededError,
  [ErrorReason.TURN_CREDENTIALS_REVOKED]: TurnCredentialsRevokedError,
  [ErrorReason.COTURN_CLI_UNAVAILABLE]: CoturnCliUnavailableError,
  [ErrorReason.COTURN_CLI_NOT_CONFIGURED]: CoturnCliNotConfiguredError,
};

/** The class by status code, for an answer with no reason or one this client does not know. */
const ERROR_CLASS_BY_CODE: Partial<Record<Code, ConcreteErrorClass>> = {
  [Code.Unauthenticated]: AuthenticationError,
  [Code.PermissionDenied]: PermissionDeniedError,
  [Code.InvalidArgument]: InvalidArgumentError,
  [Code.OutOfRange]: InvalidArgumentError,
  [Code.NotFound]: NotFoundError,
  [Code.AlreadyExists]: AlreadyExistsError,
  [Code.ResourceExhausted]: ResourceExhaustedError,
  [Code.FailedPrecondition]: FailedPreconditionError,
  [Code.Unavailable]: UnavailableError,
  [Code.DeadlineExceeded]: DeadlineExceededError,
  [Code.Canceled]: CancelledError,
};

const WIRE_REASON = /^[A-Z][A-Z0-9_]{0,63}$/;

/** The ErrorReason an ErrorInfo.reason names (`RATE_LIMITED`); UNSPECIFIED if empty or unknown. */
export function reasonFromWire(wire: string): ErrorReason {
  // protoc-gen-es drops the values' `ERROR_REASON_` prefix, which is the wire spelling (AIP-193).
  if (!WIRE_REASON.test(wire) || !Object.hasOwn(ErrorReason, wire)) return ErrorReason.UNSPECIFIED;
  const value = (ErrorReason as unknown as Record<string, unknown>)[wire];
  return typeof value === "number" ? (value as ErrorReason) : ErrorReason.UNSPECIFIED;
}

/** The ErrorInfo.reason string for `reason` (`RATE_LIMITED` for ErrorReason.RATE_LIMITED). */
export function wireReason(reason: Exclude<ErrorReason, ErrorReason.UNSPECIFIED>): string {
  return ErrorReason[reason];
}

const DETAILS = createRegistry(ErrorInfoSchema, BadRequestSchema, RetryInfoSchema, QuotaFailureSchema, HelpSchema);

/**
 * The typed error for a failed call, with its rich details: the one place a `ConnectError` (from
 * either transport) becomes an `IcegateError`. Anything else thrown is wrapped as Connect would.
 */
export function toIcegateError(error: unknown): IcegateError {
  if (error instanceof IcegateError) return error;
  const failure = ConnectError.from(error);
  const details = failure.findDetails(DETAILS);
  let reason = "";
  let metadata: Record<string, string> = {};
  for (const detail of details) {
    if (isMessage(detail, ErrorInfoSchema)) {
      reason = detail.reason;
      metadata = { ...detail.metadata };
      break;
    }
  }
  const known = reasonFromWire(reason);
  let cls: ConcreteErrorClass | undefined;
  if (known === ErrorReason.UPSTREAM_UNAVAILABLE && failure.code === Code.DeadlineExceeded) {
    // One reason, two codes: the provider failed, or did not answer before the deadline.
    cls = UpstreamTimeoutError;
  } else if (known !== ErrorReason.UNSPECIFIED) {
    cls = ERROR_CLASS_BY_REASON[known];
  }
  cls ??= ERROR_CLASS_BY_CODE[failure.code] ?? InternalError;
  return new cls(failure.rawMessage || statusName(failure.code), {
    code: failure.code,
    reason,
    metadata,
    details,
    cause: error,
  });
}

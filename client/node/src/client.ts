/**
 * `IcegateClient`: icegate's RPCs as promise methods over one reused connection, on gRPC
 * (HTTP/2, a `host:port` target) or Connect (binary protobuf over HTTP/1.1, an `http(s)://`
 * URL of icegate's HTTP listener), with the same typed errors, deadlines and retries either way.
 */

import type { DescService, MessageInitShape } from "@bufbuild/protobuf";
import { create } from "@bufbuild/protobuf";
import { type Duration, DurationSchema } from "@bufbuild/protobuf/wkt";
import { type CallOptions, type Client, Code, ConnectError, createClient, type Interceptor, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { readFileSync } from "node:fs";
import * as http from "node:http";
import * as https from "node:https";
import {
  AdminService,
  type ApiKey,
  type CreateApiKeyResponse,
  type Project,
  ProjectSchema,
  type RevokeTurnCredentialsResponse,
  type TurnSecretInfo,
} from "./gen/icegate/v1/admin_pb.js";
import {
  CredentialService,
  type GetIceServersResponse,
  type IssueTurnCredentialsResponse,
} from "./gen/icegate/v1/credentials_pb.js";
import {
  type CreateCallResponse,
  type CreateSessionResponse,
  type KeepAliveSessionResponse,
  type MintEphemeralTokenResponse,
  Provider,
  SessionOptionsSchema,
  SessionService,
} from "./gen/icegate/v1/sessions_pb.js";
import { type GetUsageResponse, UsageService } from "./gen/icegate/v1/usage_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "./gen/grpc_health/v1/health_pb.js";
import { toIcegateError } from "./errors.js";

export const DEFAULT_TARGET = "127.0.0.1:50051";
/** Milliseconds a call may take when it names no `timeoutMs`: every call carries a deadline. */
export const DEFAULT_TIMEOUT_MS = 10_000;

/** The client was given no usable target or API key (the key itself is never shown). */
export class ConfigurationError extends Error {
  override name = "ConfigurationError";
}

/**
 * TLS towards icegate: the CA to trust and, for mutual TLS, the client certificate (PEM contents).
 * When a client gives none, `ICEGATE_TLS_CA` / `ICEGATE_TLS_CERT` / `ICEGATE_TLS_KEY` name PEM files.
 */
export interface TlsOptions {
  /** PEM CAs that signed the server's certificate; the system's roots when omitted. */
  ca?: string | Buffer;
  /** PEM client certificate chain (mutual TLS), with `key`. A server that maps it to a project needs no API key. */
  cert?: string | Buffer;
  /** PEM private key of `cert` (unencrypted). */
  key?: string | Buffer;
  /** The name to check the server's certificate against, when it differs from the target's host. */
  serverName?: string;
}

export interface IcegateClientOptions {
  /**
   * `host:port` of icegate's gRPC port, or the `http://` / `https://` URL of its HTTP listener
   * (ICEGATE_HTTP_LISTEN) to call over Connect; `ICEGATE_TARGET` or 127.0.0.1:50051 when omitted.
   */
  target?: string;
  /** The caller key; `ICEGATE_API_KEY` when omitted (optional with a client certificate the server maps). */
  apiKey?: string;
  /** Call over TLS (a gRPC target) or with these TLS settings (an https:// target). */
  tls?: TlsOptions;
  /** Milliseconds a call may take when it names no `timeoutMs` (10 s by default). */
  defaultTimeoutMs?: number;
}

/** What every method takes besides its own arguments. */
export interface CallOptionsLike {
  /** The call's deadline, in milliseconds (retries included). */
  timeoutMs?: number;
  /** Cancels the call (it then fails with `CancelledError`). */
  signal?: AbortSignal;
  /** Extra request headers (gRPC metadata), e.g. `x-request-id`. */
  headers?: Record<string, string>;
}

/** A provider by name, or by its `Provider` enum value. */
export type ProviderName = Lowercase<Exclude<keyof typeof Provider, "UNSPECIFIED">> | Provider;

/** The options of a realtime session: SessionOptions' fields (sessions.proto says which provider takes which). */
export type SessionOptionsInit = MessageInitShape<typeof SessionOptionsSchema>;

/** A Project's settable fields (admin.proto), camelCase, durations as Duration messages. */
export type ProjectFields = Omit<MessageInitShape<typeof ProjectSchema>, "projectId" | "$typeName">;

/** How UNAVAILABLE is retried, as the Python client's `RETRY_POLICY`: attempts in all, and the backoff. */
export const RETRY_POLICY = { maxAttempts: 3, initialBackoffMs: 100, maxBackoffMs: 1000, multiplier: 2 } as const;
/**
 * The services whose calls are retried on UNAVAILABLE: they change nothing a retry would double
 * (a session or an admin change is never retried), as in the Python client's service config.
 */
export const RETRYING_SERVICES: readonly string[] = [CredentialService.typeName, UsageService.typeName, Health.typeName];

const HOST_PORT = /^(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?):[0-9]{1,5}$/;
const HTTP_URL = /^https?:\/\//i;
const API_KEY = /^[\x21-\x7e]{1,512}$/;

/** The first 100 characters of a target, for an error message (targets are not secrets). */
function shown(value: string): string {
  return JSON.stringify(value.slice(0, 100));
}

function readPem(what: string, path: string | undefined): Buffer | undefined {
  if (!path) return undefined;
  try {
    return readFileSync(path);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? "unreadable";
    throw new ConfigurationError(`TLS: cannot read the ${what} file ${shown(path)}: ${code}`);
  }
}

/** The given TLS options, else the files `ICEGATE_TLS_CA` / `_CERT` / `_KEY` name; undefined for none. */
function resolveTls(tls: TlsOptions | undefined): TlsOptions | undefined {
  const resolved = tls ?? {
    ca: readPem("CA", process.env.ICEGATE_TLS_CA),
    cert: readPem("certificate", process.env.ICEGATE_TLS_CERT),
    key: readPem("key", process.env.ICEGATE_TLS_KEY),
  };
  if (!resolved.ca && !resolved.cert && !resolved.key && !resolved.serverName) return undefined;
  if (Boolean(resolved.cert) !== Boolean(resolved.key)) {
    throw new ConfigurationError("TLS: a client certificate and its key go together (cert and key, ICEGATE_TLS_CERT and ICEGATE_TLS_KEY)");
  }
  return resolved;
}

function tlsSocketOptions(tls: TlsOptions): https.AgentOptions {
  return {
    ...(tls.ca ? { ca: tls.ca } : {}),
    ...(tls.cert ? { cert: tls.cert, key: tls.key } : {}),
    ...(tls.serverName ? { servername: tls.serverName } : {}),
  };
}

/** Whether `target` selects Connect (an http:// or https:// URL) rather than gRPC. */
export function isHttpTarget(target: string): boolean {
  return HTTP_URL.test(target);
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
    function done(): void {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
  });
}

/** Retries UNAVAILABLE for `RETRYING_SERVICES` with exponential backoff and full jitter, within the deadline. */
const retryUnavailable: Interceptor = (next) => async (request) => {
  if (request.stream || !RETRYING_SERVICES.includes(request.service.typeName)) return next(request);
  let backoffMs: number = RETRY_POLICY.initialBackoffMs;
  for (let attempt = 1; ; attempt++) {
    try {
      return await next(request);
    } catch (error) {
      const failure = ConnectError.from(error);
      if (failure.code !== Code.Unavailable || attempt >= RETRY_POLICY.maxAttempts || request.signal.aborted) {
        throw error;
      }
    }
    await sleep(Math.random() * backoffMs, request.signal);
    backoffMs = Math.min(backoffMs * RETRY_POLICY.multiplier, RETRY_POLICY.maxBackoffMs);
    if (request.signal.aborted) throw ConnectError.from(request.signal.reason, Code.Canceled);
  }
};

/**
 * A generated service client whose methods throw `IcegateError`s (with the rich details) instead
 * of `ConnectError`s: the one place errors are converted, for the wrapper and for callers who use
 * the services directly (`client.admin.listProjects({})`).
 */
export type TypedClient<Service extends DescService> = Client<Service>;

function typedClient<Service extends DescService>(service: Service, transport: Transport): TypedClient<Service> {
  const raw = createClient(service, transport) as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
  const typed: Record<string, (...args: unknown[]) => Promise<unknown>> = {};
  for (const name of Object.keys(service.method)) {
    typed[name] = async (...args: unknown[]) => {
      try {
        return await raw[name]!(...args);
      } catch (error) {
        throw toIcegateError(error);
      }
    };
  }
  return typed as unknown as TypedClient<Service>;
}

function duration(seconds: number, what: string): Duration {
  if (!Number.isFinite(seconds)) throw new RangeError(`${what} must be a finite number of seconds`);
  const whole = Math.floor(seconds);
  return create(DurationSchema, { seconds: BigInt(whole), nanos: Math.round((seconds - whole) * 1e9) });
}

/** The `Provider` enum value of a provider name. */
export function providerValue(provider: ProviderName): Provider {
  if (typeof provider === "number") return provider;
  const name = String(provider).toUpperCase();
  if (/^[A-Z_]{1,32}$/.test(name) && name !== "UNSPECIFIED" && Object.hasOwn(Provider, name)) {
    return (Provider as unknown as Record<string, Provider>)[name]!;
  }
  const names = Object.keys(Provider).filter((k) => Number.isNaN(Number(k)) && k !== "UNSPECIFIED");
  throw new RangeError(`unknown provider ${shown(String(provider))}; one of ${names.map((n) => n.toLowerCase()).join(", ")}`);
}

/** icegate's RPCs over one connection. Close it with `close()` when done. */
export class IcegateClient {
  /** Where calls go: the gRPC `host:port` or the Connect URL. */
  readonly target: string;
  /** `"grpc"` or `"connect"`, from the form of `target`. */
  readonly protocol: "grpc" | "connect";
  /** The services as generated, for RPCs the wrapper has no method for; they throw `IcegateError`s too. */
  readonly credentials: TypedClient<typeof CredentialService>;
  readonly sessions: TypedClient<typeof SessionService>;
  readonly usage: TypedClient<typeof UsageService>;
  readonly admin: TypedClient<typeof AdminService>;
  readonly healthService: TypedClient<typeof Health>;

  readonly #defaultTimeoutMs: number;
  readonly #close: () => void;

  constructor(options: IcegateClientOptions = {}) {
    const target = options.target || process.env.ICEGATE_TARGET || DEFAULT_TARGET;
    const apiKey = options.apiKey || process.env.ICEGATE_API_KEY || "";
    const tls = resolveTls(options.tls);
    if (!apiKey && !tls?.cert) {
      throw new ConfigurationError("no API key: pass apiKey or set ICEGATE_API_KEY (or present a client certificate the server maps)");
    }
    if (apiKey && !API_KEY.test(apiKey)) {
      throw new ConfigurationError("the API key must be 1 to 512 printable ASCII characters without spaces");
    }
    this.#defaultTimeoutMs = options.defaultTimeoutMs ?? DEFAULT_TIMEOUT_MS;
    if (!(this.#defaultTimeoutMs > 0)) throw new ConfigurationError("defaultTimeoutMs must be above 0");

    const authorize: Interceptor = (next) => (request) => {
      // Health checks carry no key (load balancers and probes make them without one).
      if (request.service.typeName !== Health.typeName) request.header.set("authorization", `Bearer ${apiKey}`);
      return next(request);
    };
    const interceptors = apiKey ? [retryUnavailable, authorize] : [retryUnavailable];
    let transport: Transport;
    if (isHttpTarget(target)) {
      let url: URL;
      try {
        url = new URL(target);
      } catch {
        throw new ConfigurationError(`target ${shown(target)} is not a URL`);
      }
      if (url.username || url.password || url.search || url.hash) {
        throw new ConfigurationError(`target ${shown(url.origin)}: give the URL without credentials, query or fragment`);
      }
      if (tls && url.protocol !== "https:") throw new ConfigurationError("TLS settings need an https:// target");
      // Our own keep-alive agent, so that close() ends its idle connections.
      const agent =
        url.protocol === "https:"
          ? new https.Agent({ keepAlive: true, ...(tls ? tlsSocketOptions(tls) : {}) })
          : new http.Agent({ keepAlive: true });
      transport = createConnectTransport({
        baseUrl: url.href.replace(/\/$/, ""),
        httpVersion: "1.1",
        useBinaryFormat: true,
        nodeOptions: { agent },
        interceptors,
      });
      this.protocol = "connect";
      this.#close = () => agent.destroy();
    } else {
      if (!HOST_PORT.test(target)) {
        throw new ConfigurationError(`target ${shown(target)} is neither host:port (gRPC) nor an http(s):// URL (Connect)`);
      }
      const baseUrl = `${tls ? "https" : "http"}://${target}`;
      // Keepalive as the Python client's channel: a silently dropped connection is found within ~70 s.
      const sessionManager = new Http2SessionManager(
        baseUrl,
        { pingIntervalMs: 60_000, pingTimeoutMs: 10_000 },
        tls ? tlsSocketOptions(tls) : undefined,
      );
      transport = createGrpcTransport({ baseUrl, sessionManager, interceptors });
      this.protocol = "grpc";
      this.#close = () => sessionManager.abort();
    }
    this.target = target;
    this.credentials = typedClient(CredentialService, transport);
    this.sessions = typedClient(SessionService, transport);
    this.usage = typedClient(UsageService, transport);
    this.admin = typedClient(AdminService, transport);
    this.healthService = typedClient(Health, transport);
  }

  /** Ends the connection; calls in flight fail. */
  close(): void {
    this.#close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #call(options: CallOptionsLike): CallOptions {
    const call: CallOptions = { timeoutMs: options.timeoutMs ?? this.#defaultTimeoutMs };
    if (options.signal) call.signal = options.signal;
    if (options.headers) call.headers = options.headers;
    return call;
  }

  /** The serving status of the server (or of one service), e.g. `"SERVING"`; sends no key. */
  async health(service = "", options: CallOptionsLike = {}): Promise<string> {
    const response = await this.healthService.check({ service }, this.#call(options));
    return HealthCheckResponse_ServingStatus[response.status] ?? "UNKNOWN";
  }

  /** Issues a TURN credential for `userId` (lifetime `ttlSeconds`, else the project's default). */
  issueTurnCredentials(
    userId: string,
    options: { ttlSeconds?: number; projectId?: string } & CallOptionsLike = {},
  ): Promise<IssueTurnCredentialsResponse> {
    return this.credentials.issueTurnCredentials(
      {
        userId,
        projectId: options.projectId ?? "",
        ...(options.ttlSeconds === undefined ? {} : { ttl: duration(options.ttlSeconds, "ttlSeconds") }),
      },
      this.#call(options),
    );
  }

  /** The RTCIceServer list for `userId`; `rtcIceServers()` turns it into what a browser takes. */
  getIceServers(
    userId: string,
    options: { ttlSeconds?: number; projectId?: string } & CallOptionsLike = {},
  ): Promise<GetIceServersResponse> {
    return this.credentials.getIceServers(
      {
        userId,
        projectId: options.projectId ?? "",
        ...(options.ttlSeconds === undefined ? {} : { ttl: duration(options.ttlSeconds, "ttlSeconds") }),
      },
      this.#call(options),
    );
  }

  /** The project's rate-limit position, session counts, TURN usage and limits (not rate limited). */
  getUsage(options: { projectId?: string; turnUserId?: string } & CallOptionsLike = {}): Promise<GetUsageResponse> {
    return this.usage.getUsage(
      { projectId: options.projectId ?? "", turnUserId: options.turnUserId ?? "" },
      this.#call(options),
    );
  }

  /**
   * Creates a realtime session: a provider token plus ICE servers, under the project's quota and
   * concurrency limit. Not retried: a retry would create a second session.
   */
  createSession(
    provider: ProviderName = "openai",
    options: {
      projectId?: string;
      userId?: string;
      turnTtlSeconds?: number;
      options?: SessionOptionsInit;
    } & CallOptionsLike = {},
  ): Promise<CreateSessionResponse> {
    return this.sessions.createSession(
      {
        projectId: options.projectId ?? "",
        provider: providerValue(provider),
        options: options.options ?? {},
        userId: options.userId ?? "",
        ...(options.turnTtlSeconds === undefined ? {} : { turnTtl: duration(options.turnTtlSeconds, "turnTtlSeconds") }),
      },
      this.#call(options),
    );
  }

  /** A provider token alone (rate limited, but no quota unit and no lease). */
  mintEphemeralToken(
    provider: ProviderName = "openai",
    options: { projectId?: string; options?: SessionOptionsInit } & CallOptionsLike = {},
  ): Promise<MintEphemeralTokenResponse> {
    return this.sessions.mintEphemeralToken(
      { projectId: options.projectId ?? "", provider: providerValue(provider), options: options.options ?? {} },
      this.#call(options),
    );
  }

  /**
   * Starts a provider call for the browser's SDP offer (OpenAI or Azure GA) under the quota: the
   * answer SDP, call id, session id and ICE servers. Not retried: a retry would start a second call.
   */
  createCall(
    sdpOffer: string,
    provider: ProviderName = "openai",
    options: { projectId?: string; userId?: string; turnTtlSeconds?: number; options?: SessionOptionsInit } & CallOptionsLike = {},
  ): Promise<CreateCallResponse> {
    return this.sessions.createCall(
      {
        projectId: options.projectId ?? "",
        provider: providerValue(provider),
        options: options.options ?? {},
        sdpOffer,
        userId: options.userId ?? "",
        ...(options.turnTtlSeconds === undefined ? {} : { turnTtl: duration(options.turnTtlSeconds, "turnTtlSeconds") }),
      },
      this.#call(options),
    );
  }

  /** Renews a session's lease; `NotFoundError` once it ended or expired. */
  keepAliveSession(sessionId: string, options: { projectId?: string } & CallOptionsLike = {}): Promise<KeepAliveSessionResponse> {
    return this.sessions.keepAliveSession({ projectId: options.projectId ?? "", sessionId }, this.#call(options));
  }

  /** Ends a session, freeing its place under the concurrency limit. */
  async endSession(sessionId: string, options: { projectId?: string } & CallOptionsLike = {}): Promise<void> {
    await this.sessions.endSession({ projectId: options.projectId ?? "", sessionId }, this.#call(options));
  }

  // -- administration (admin keys only); every other admin RPC is on `client.admin` ----------

  /** Creates a project with the given fields (admin.proto's Project, camelCase). */
  async createProject(projectId: string, fields: ProjectFields = {}, options: CallOptionsLike = {}): Promise<Project> {
    const response = await this.admin.createProject({ project: { ...fields, projectId } }, this.#call(options));
    return response.project!;
  }

  /** Creates a caller key; the answer's `secret` is shown this once only. */
  createApiKey(
    projectId = "",
    options: { admin?: boolean; displayName?: string } & CallOptionsLike = {},
  ): Promise<CreateApiKeyResponse> {
    return this.admin.createApiKey(
      { projectId, admin: options.admin ?? false, displayName: options.displayName ?? "" },
      this.#call(options),
    );
  }

  /** Revokes a caller key: refused from its next call on. */
  async revokeApiKey(keyId: string, options: CallOptionsLike = {}): Promise<ApiKey> {
    return (await this.admin.revokeApiKey({ keyId }, this.#call(options))).apiKey!;
  }

  /** Seals and stores a project's provider key; only its last 4 characters come back. */
  async setProviderKey(projectId: string, provider: string, apiKey: string, options: CallOptionsLike = {}) {
    return (await this.admin.setProviderKey({ projectId, provider, apiKey }, this.#call(options))).providerKey!;
  }

  /**
   * Revokes one end user's (or one session's) TURN credentials: new ones are refused until those
   * issued before have expired, and its allocations on coturn are ended.
   */
  revokeTurnCredentials(
    projectId: string,
    options: ({ userId: string } | { sessionId: string }) & CallOptionsLike,
  ): Promise<RevokeTurnCredentialsResponse> {
    const subject =
      "userId" in options
        ? { case: "userId" as const, value: options.userId }
        : { case: "sessionId" as const, value: options.sessionId };
    return this.admin.revokeTurnCredentials({ projectId, subject }, this.#call(options));
  }

  /** Makes a fresh TURN secret the signer; the secrets in force (ids only). */
  async rotateTurnSecret(options: { coturnRestartPlanned?: boolean } & CallOptionsLike = {}): Promise<TurnSecretInfo[]> {
    const response = await this.admin.rotateTurnSecret(
      { coturnRestartPlanned: options.coturnRestartPlanned ?? false },
      this.#call(options),
    );
    return response.turnSecrets;
  }
}

/**
 * An Express endpoint that hands the browser what it needs for a realtime WebRTC session: the
 * Node twin of examples/fastapi_app.py.
 *
 *     npm run build
 *     ICEGATE_TARGET=127.0.0.1:50051 ICEGATE_API_KEY=igk_... PORT=3000 node dist/examples/expressApp.js
 *
 * The browser calls `POST /api/realtime-session` and gets `{ephemeralToken, expiresAt,
 * iceServers, sessionId}`; the icegate key and the provider key never reach it.
 */

import { timestampDate } from "@bufbuild/protobuf/wkt";
import express, { type NextFunction, type Request, type Response } from "express";
import { pathToFileURL } from "node:url";
import {
  ConcurrentLimitError,
  type CreateSessionResponse,
  DeadlineExceededError,
  IcegateClient,
  IcegateError,
  InvalidArgumentError,
  NotFoundError,
  QuotaExceededError,
  RateLimitedError,
  rtcIceServers,
  UnavailableError,
} from "@icegate/client";

/** What the browser gets for a new session: all it needs, no keys. */
export function browserSession(created: CreateSessionResponse) {
  const expireTime = created.ephemeralToken?.expireTime;
  return {
    ephemeralToken: created.ephemeralToken?.value ?? "",
    expiresAt: expireTime ? timestampDate(expireTime).toISOString() : null,
    iceServers: rtcIceServers([...created.iceServers, ...created.providerIceServers]),
    sessionId: created.sessionId,
  };
}

/** The HTTP answer to the browser for an icegate error (never the keys, never internals). */
export function httpError(error: IcegateError): { status: number; body: Record<string, unknown>; headers: Record<string, string> } {
  const headers: Record<string, string> = {};
  if (error instanceof QuotaExceededError) {
    return { status: 402, body: { error: "quota_exceeded", usage: error.usage, upgrade_url: error.upgradeUrl }, headers };
  }
  if (error instanceof ConcurrentLimitError) {
    return { status: 429, body: { error: "concurrent_limit_exceeded", current: error.current, max: error.maxSessions }, headers };
  }
  if (error instanceof RateLimitedError) {
    if (error.retryAfterMs !== undefined) headers["Retry-After"] = String(Math.max(1, Math.ceil(error.retryAfterMs / 1000)));
    return { status: 429, body: { error: "rate_limited", resetAt: error.resetAt?.toISOString() ?? null }, headers };
  }
  if (error instanceof InvalidArgumentError) {
    return { status: 400, body: { error: "invalid_argument", fields: error.fieldViolations }, headers };
  }
  if (error instanceof NotFoundError) {
    return { status: 404, body: { error: "session_not_found" }, headers };
  }
  if (error instanceof UnavailableError || error instanceof DeadlineExceededError) {
    return { status: 503, body: { error: "temporarily_unavailable" }, headers };
  }
  // Misconfiguration (no provider key, key refused, bad icegate key...): ours to fix.
  console.error(`icegate: ${error}`);
  return { status: 502, body: { error: "session_unavailable", reason: error.reason }, headers };
}

const SESSION_ID = /^[A-Za-z0-9_-]{1,128}$/;

/** The app; `projectId` defaults to ICEGATE_PROJECT (empty: the key's own project). */
export function createApp(client: IcegateClient, projectId = process.env.ICEGATE_PROJECT ?? "") {
  const app = express();
  app.use(express.json({ limit: "16kb" }));

  app.post("/api/realtime-session", async (request: Request, response: Response) => {
    const body: unknown = request.body ?? {};
    const { voice = "", instructions = "" } = (typeof body === "object" && body !== null ? body : {}) as Record<string, unknown>;
    if (typeof voice !== "string" || typeof instructions !== "string") {
      response.status(400).json({ error: "invalid_argument", fields: [{ field: "voice/instructions", description: "must be strings" }] });
      return;
    }
    // Stands in for your own authentication: use your logged-in user's id.
    const userId = request.get("x-user-id") ?? "anonymous";
    const created = await client.createSession("openai", {
      projectId,
      userId,
      options: { voice, instructions },
      timeoutMs: 5000,
    });
    response.json(browserSession(created));
  });

  app.post("/api/realtime-session/:sessionId/end", async (request: Request, response: Response) => {
    // A real app checks that this session belongs to the signed-in user first.
    const sessionId = String(request.params.sessionId);
    if (!SESSION_ID.test(sessionId)) {
      response.status(404).json({ error: "session_not_found" });
      return;
    }
    await client.endSession(sessionId, { projectId, timeoutMs: 5000 });
    response.json({ sessionId, ended: true });
  });

  app.use((error: unknown, _request: Request, response: Response, next: NextFunction) => {
    if (error instanceof IcegateError) {
      const { status, body, headers } = httpError(error);
      response.status(status).set(headers).json(body);
    } else if (typeof error === "object" && error !== null && (error as { type?: unknown }).type === "entity.parse.failed") {
      response.status(400).json({ error: "invalid_json" });
    } else {
      next(error);
    }
  });
  return app;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  // One client (one connection) for the app's lifetime.
  const client = new IcegateClient();
  const server = createApp(client).listen(Number(process.env.PORT ?? 3000), "127.0.0.1");
  process.on("SIGTERM", () => server.close(() => client.close()));
}

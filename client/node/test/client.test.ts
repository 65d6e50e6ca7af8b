/** IcegateClient against the real server, over gRPC and over Connect: each method, each error a caller can provoke. */

import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { after, before, describe, test } from "node:test";
import {
  AlreadyExistsError,
  AuthenticationError,
  ConcurrentLimitError,
  ConfigurationError,
  CoturnCliNotConfiguredError,
  CoturnOutOfStepError,
  ErrorReason,
  IcegateClient,
  IcegateError,
  InvalidArgumentError,
  NotFoundError,
  ProjectForbiddenError,
  providerValue,
  QuotaExceededError,
  RateLimitedError,
  rtcIceServers,
  SessionPolicyError,
  TurnCredentialsRevokedError,
  UnavailableError,
  UpstreamAuthFailedError,
  UpstreamNotConfiguredError,
} from "@icegate/client";
import { env, TRANSPORTS } from "./environment.js";

const SECRETS = [env.adminKey, env.openaiKey, env.turnSecret];

/** The error `promise` rejects with, checked to be an `expected` and to show no key or secret. */
async function refusal<T extends IcegateError>(promise: Promise<unknown>, expected: abstract new (...args: never[]) => T): Promise<T> {
  const error = await promise.then(
    () => assert.fail(`expected a ${expected.name}`),
    (e: unknown) => e,
  );
  assert.ok(error instanceof expected, `expected a ${expected.name}, got ${String(error)}`);
  const shown = `${String(error)} ${JSON.stringify(error.metadata)} ${error.stack ?? ""}`;
  for (const secret of SECRETS) assert.ok(!shown.includes(secret), "a secret in the error");
  return error;
}

const hmac = (username: string) => createHmac("sha1", env.turnSecret).update(username).digest("base64");
const firstOfNextMonth = () => {
  const now = new Date(env.now * 1000);
  return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1));
};

test("a client needs a key and a usable target, and never shows the key", () => {
  const saved = process.env.ICEGATE_API_KEY;
  delete process.env.ICEGATE_API_KEY;
  try {
    assert.throws(() => new IcegateClient({ target: env.grpcTarget }), ConfigurationError);
  } finally {
    if (saved !== undefined) process.env.ICEGATE_API_KEY = saved;
  }
  const badKey = "igk_line\r\nx-injected: yes";
  assert.throws(
    () => new IcegateClient({ target: env.grpcTarget, apiKey: badKey }),
    (e: unknown) => e instanceof ConfigurationError && !e.message.includes("igk_line"),
  );
  for (const target of ["dns:///icegate:50051", "icegate", "127.0.0.1:50051/x", "http://user:pw@127.0.0.1:1", "http://[::1"]) {
    assert.throws(() => new IcegateClient({ target, apiKey: env.adminKey }), ConfigurationError, target);
  }
  assert.throws(() => new IcegateClient({ target: env.grpcTarget, apiKey: env.adminKey, defaultTimeoutMs: 0 }), ConfigurationError);
  assert.throws(() => providerValue("nope" as "openai"), RangeError);
  assert.equal(new IcegateClient({ target: "HTTP://127.0.0.1:1", apiKey: "k" }).protocol, "connect");
});

for (const transport of TRANSPORTS) {
  describe(`over ${transport.name}`, () => {
    const t = transport.name;
    let admin: IcegateClient;
    const opened: IcegateClient[] = [];
    const client = (apiKey: string) => {
      const c = new IcegateClient({ target: transport.target, apiKey });
      opened.push(c);
      return c;
    };

    before(() => {
      admin = client(env.adminKey);
      assert.equal(admin.protocol, t);
    });
    after(() => opened.forEach((c) => c.close()));

    test("issueTurnCredentials signs <expiry>:<project>/<user> with the TURN secret", async () => {
      const issued = await admin.issueTurnCredentials("alice", { ttlSeconds: 600 });
      assert.equal(issued.username, `${env.now + 600}:default/alice`);
      assert.equal(issued.password, hmac(issued.username));
      assert.equal(issued.ttl?.seconds, 600n);
      assert.equal(timestampDate(issued.expireTime!).getTime(), (env.now + 600) * 1000);
      assert.deepEqual(issued.uris, env.turnUris);
      const byDefault = await admin.issueTurnCredentials("bob");
      assert.equal(byDefault.username, `${env.now + 3600}:default/bob`);
    });

    test("getIceServers gives the STUN entry, then TURN with one credential, as a browser takes it", async () => {
      const listed = await admin.getIceServers("carol", { ttlSeconds: 120, timeoutMs: 5000 });
      const username = `${env.now + 120}:default/carol`;
      assert.deepEqual(rtcIceServers(listed.iceServers), [
        { urls: env.stunUris },
        { urls: env.turnUris, username, credential: hmac(username) },
      ]);
    });

    test("health answers SERVING without a key; an unknown service is NotFound", async () => {
      assert.equal(await admin.health(), "SERVING");
      // This client's key is unknown: health calls do not send it.
      assert.equal(await client(`igk_unknown_${"y".repeat(30)}`).health("", { timeoutMs: 5000 }), "SERVING");
      await refusal(admin.health("icegate.v1.NoSuchService"), NotFoundError);
    });

    test("an unknown key is an AuthenticationError; so is a revoked one", async () => {
      const stranger = client(`igk_unknown_${"x".repeat(30)}`);
      const error = await refusal(stranger.issueTurnCredentials("alice"), AuthenticationError);
      assert.deepEqual([error.code, error.codeName, error.reason, error.errorReason], [
        Code.Unauthenticated, "UNAUTHENTICATED", "INVALID_API_KEY", ErrorReason.INVALID_API_KEY]);
      assert.ok(!String(error).includes("igk_unknown_"));

      await admin.createProject(`auth-${t}`);
      const created = await admin.createApiKey(`auth-${t}`, { displayName: "to revoke" });
      const caller = client(created.secret);
      await caller.issueTurnCredentials("dave");
      const revoked = await admin.revokeApiKey(created.apiKey!.keyId);
      assert.ok(revoked.revokeTime);
      await refusal(caller.issueTurnCredentials("dave"), AuthenticationError);
    });

    test("a bad field is an InvalidArgumentError naming it", async () => {
      const separator = await refusal(admin.issueTurnCredentials("eve:admin"), InvalidArgumentError);
      assert.equal(separator.code, Code.InvalidArgument);
      assert.deepEqual(separator.fieldViolations.map((v) => v.field), ["user_id"]);
      assert.ok(separator.fieldViolations[0]!.description.length > 0);
      const ttl = await refusal(admin.getIceServers("eve", { ttlSeconds: 5 }), InvalidArgumentError);
      assert.deepEqual(ttl.fieldViolations.map((v) => v.field), ["ttl"]);
      assert.throws(() => admin.issueTurnCredentials("eve", { ttlSeconds: Number.NaN }), RangeError);
    });

    test("a project's limits and the admin errors: rate limit, forbidden, exists, not found", async () => {
      const project = `rl-${t}`;
      const created = await admin.createProject(project, {
        displayName: "rate limited",
        rateLimitRequests: 2,
        rateLimitWindow: { seconds: 3600n },
      });
      assert.deepEqual([created.projectId, created.rateLimitRequests], [project, 2]);
      const key = (await admin.createApiKey(project)).secret;
      const caller = client(key);
      await caller.issueTurnCredentials("frank");
      await caller.getIceServers("frank");
      const limited = await refusal(caller.issueTurnCredentials("frank"), RateLimitedError);
      assert.deepEqual([limited.code, limited.reason, limited.limit], [Code.ResourceExhausted, "RATE_LIMITED", 2]);
      const resetAt = limited.resetAt!.getTime();
      assert.ok(resetAt > env.now * 1000 && resetAt <= (env.now + 3600) * 1000, String(limited.resetAt));
      assert.equal(limited.retryAfterMs, resetAt - env.now * 1000);

      const other = `fb-${t}`;
      await admin.createProject(other);
      const outsider = client((await admin.createApiKey(other)).secret);
      const forbidden = await refusal(outsider.issueTurnCredentials("gina", { projectId: "default" }), ProjectForbiddenError);
      assert.deepEqual([forbidden.code, forbidden.reason], [Code.PermissionDenied, "PROJECT_FORBIDDEN"]);

      await refusal(admin.createProject(project), AlreadyExistsError);
      const missing = await refusal(admin.admin.getProject({ projectId: `nowhere-${t}` }), NotFoundError);
      assert.equal(missing.reason, "NOT_FOUND");
    });

    test("sessions: create, keep alive, end; the concurrency limit and the monthly quota with their details", async () => {
      const project = `ses-${t}`;
      await admin.createProject(project, {
        plan: "starter",
        upgradeUrl: "https://billing.example.test/upgrade",
        monthlySessionQuota: 2,
        maxConcurrentSessions: 1,
      });
      const stored = await admin.setProviderKey(project, "openai", env.openaiKey);
      assert.equal(stored.last4, "…5678");

      const first = await admin.createSession("openai", {
        projectId: project,
        userId: "hana",
        options: { voice: "echo", instructions: "Be brief." },
      });
      assert.ok(first.ephemeralToken!.value.startsWith("ek_"));
      assert.ok(first.sessionId.startsWith("ses_"));
      assert.equal(first.voice, "echo");
      assert.equal(first.createTime?.seconds, BigInt(env.now));
      assert.equal(first.leaseExpireTime?.seconds, BigInt(env.now + 600));
      assert.equal(rtcIceServers(first.iceServers)[1]!.username, `${env.now + 3600}:${project}/hana`);
      const renewed = await admin.keepAliveSession(first.sessionId, { projectId: project });
      assert.equal(renewed.leaseExpireTime?.seconds, BigInt(env.now + 600));

      const crowded = await refusal(admin.createSession("openai", { projectId: project }), ConcurrentLimitError);
      assert.deepEqual([crowded.code, crowded.current, crowded.maxSessions], [Code.ResourceExhausted, 1, 1]);

      await admin.endSession(first.sessionId, { projectId: project });
      await refusal(admin.keepAliveSession(first.sessionId, { projectId: project }), NotFoundError);
      await refusal(admin.endSession(first.sessionId, { projectId: project }), NotFoundError);
      const second = await admin.createSession(providerValue("openai"), { projectId: project, userId: "iris", turnTtlSeconds: 300 });
      assert.equal(rtcIceServers(second.iceServers)[1]!.username, `${env.now + 300}:${project}/iris`);
      await admin.endSession(second.sessionId, { projectId: project });

      const spent = await refusal(admin.createSession("openai", { projectId: project }), QuotaExceededError);
      assert.equal(spent.reason, "QUOTA_EXCEEDED");
      assert.deepEqual(spent.usage, { plan: "starter", sessionsIncluded: 2, sessionsUsed: 2, sessionsRemaining: 0 });
      assert.equal(spent.upgradeUrl, "https://billing.example.test/upgrade");
      assert.equal(spent.resetsAt?.getTime(), firstOfNextMonth().getTime());
      assert.ok(spent.quotaViolations.length >= 1, "a QuotaFailure detail");

      const usage = await admin.getUsage({ projectId: project });
      assert.deepEqual([usage.sessions?.usedThisMonth, usage.sessions?.remainingThisMonth, usage.sessions?.active], [2, 0, 0]);
      assert.equal(usage.plan, "starter");

      // A token alone takes no quota unit.
      const minted = await admin.mintEphemeralToken("openai", { projectId: project, options: { voice: "marin" } });
      assert.ok(minted.ephemeralToken!.value.startsWith("ek_"));
    });

    test("createCall relays the browser's SDP offer and answers the provider's SDP, under a session", async () => {
      const project = `call-${t}`;
      await admin.createProject(project);
      await admin.setProviderKey(project, "openai", env.openaiKey);
      const offer =
        "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n" +
        "a=group:BUNDLE 0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n" +
        "c=IN IP4 0.0.0.0\r\na=mid:0\r\na=sctp-port:5000\r\n";
      const call = await admin.createCall(offer, "openai", { projectId: project, userId: "lena", options: { voice: "marin" } });
      assert.ok(call.sdpAnswer.startsWith("v=0"), call.sdpAnswer);
      assert.ok(call.callId.startsWith("rtc_"), call.callId);
      assert.ok(call.sessionId.startsWith("ses_"));
      assert.equal(rtcIceServers(call.iceServers)[1]!.username, `${env.now + 3600}:${project}/lena`);
      assert.equal((await admin.getUsage({ projectId: project })).sessions?.active, 1);
      await admin.endSession(call.sessionId, { projectId: project });
      const notSdp = await refusal(admin.createCall("hello", "openai", { projectId: project }), InvalidArgumentError);
      assert.deepEqual(notSdp.fieldViolations.map((v) => v.field), ["sdp_offer"]);
    });

    test("upstream errors: no provider key, a key the provider refuses", async () => {
      await admin.createProject(`nokey-${t}`);
      const missing = await refusal(admin.createSession("openai", { projectId: `nokey-${t}` }), UpstreamNotConfiguredError);
      assert.deepEqual([missing.code, missing.provider, missing.upstreamStatus], [Code.FailedPrecondition, "openai", 0]);

      const wrongKey = "sk-test-WRONG-key-0000";
      await admin.createProject(`badkey-${t}`);
      await admin.setProviderKey(`badkey-${t}`, "openai", wrongKey);
      const refused = await refusal(admin.createSession("openai", { projectId: `badkey-${t}` }), UpstreamAuthFailedError);
      assert.deepEqual([refused.reason, refused.provider, refused.upstreamStatus], ["UPSTREAM_AUTH_FAILED", "openai", 401]);
      assert.ok(refused.upstreamRequestId.startsWith("req_"), refused.upstreamRequestId);
      assert.ok(!String(refused).includes(wrongKey));
    });

    test("an option outside the project's session policy is a SessionPolicyError naming it", async () => {
      const project = `policy-${t}`;
      await admin.createProject(project);
      await admin.setProviderKey(project, "openai", env.openaiKey);
      await admin.admin.setSessionPolicy({ projectId: project, provider: "openai", policy: { allowedVoices: ["verse"], callerOptions: ["voice"] } });
      const refused = await refusal(admin.createSession("openai", { projectId: project, options: { voice: "alloy" } }), SessionPolicyError);
      assert.deepEqual([refused.code, refused.field], [Code.PermissionDenied, "voice"]);
      const allowed = await admin.createSession("openai", { projectId: project, options: { voice: "verse" } });
      assert.equal(allowed.voice, "verse");
    });

    test("TURN administration: revoked credentials, no coturn CLI, a rotation coturn would not follow", async () => {
      const user = `mallory-${t}`;
      await admin.issueTurnCredentials(user);
      // No coturn CLI configured: the allocations cannot be ended, the revocation holds all the same.
      const noCli = await refusal(admin.revokeTurnCredentials("default", { userId: user }), CoturnCliNotConfiguredError);
      assert.deepEqual([noCli.code, noCli.reason], [Code.FailedPrecondition, "COTURN_CLI_NOT_CONFIGURED"]);
      const revoked = await refusal(admin.issueTurnCredentials(user), TurnCredentialsRevokedError);
      assert.equal(revoked.code, Code.PermissionDenied);
      assert.ok(revoked.revokedUntil!.getTime() > env.now * 1000, String(revoked.revokedUntil));

      const outOfStep = await refusal(admin.rotateTurnSecret(), CoturnOutOfStepError);
      assert.equal(outOfStep.reason, "COTURN_OUT_OF_STEP");
      // The signer did not change.
      const issued = await admin.issueTurnCredentials("after-rotation");
      assert.equal(issued.password, hmac(issued.username));
    });

    test("a server that cannot be reached is an UnavailableError", async () => {
      const target = t === "grpc" ? "127.0.0.1:1" : "http://127.0.0.1:1";
      const nowhere = new IcegateClient({ target, apiKey: env.adminKey, defaultTimeoutMs: 5000 });
      try {
        const error = await refusal(nowhere.issueTurnCredentials("ivan"), UnavailableError);
        assert.equal(error.code, Code.Unavailable);
      } finally {
        nowhere.close();
      }
    });
  });
}

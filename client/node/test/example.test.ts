/** The Express example (examples/expressApp.ts) on a real port, in front of the real icegate, over both protocols. */

import assert from "node:assert/strict";
import type * as http from "node:http";
import type { AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";
import { IcegateClient } from "@icegate/client";
import { createApp } from "../examples/expressApp.js";
import { env, TRANSPORTS } from "./environment.js";

for (const transport of TRANSPORTS) {
  describe(`the Express example over ${transport.name}`, () => {
    const project = `web-${transport.name}`;
    let projectKey = "";
    let client: IcegateClient;
    let server: http.Server;
    let base = "";

    before(async () => {
      const admin = new IcegateClient({ target: transport.target, apiKey: env.adminKey });
      try {
        await admin.createProject(project, { monthlySessionQuota: 2, maxConcurrentSessions: 1, plan: "free" });
        await admin.setProviderKey(project, "openai", env.openaiKey);
        projectKey = (await admin.createApiKey(project)).secret;
      } finally {
        admin.close();
      }
      client = new IcegateClient({ target: transport.target, apiKey: projectKey });
      // The project comes from the key, as ICEGATE_PROJECT unset would have it.
      const app = createApp(client, "");
      server = await new Promise<http.Server>((resolve) => {
        const listening = app.listen(0, "127.0.0.1", () => resolve(listening));
      });
      base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    });
    after(async () => {
      client.close();
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    });

    const post = async (path: string, body?: string, headers: Record<string, string> = {}) => {
      const response = await fetch(base + path, {
        method: "POST",
        headers: { "content-type": "application/json", ...headers },
        ...(body === undefined ? {} : { body }),
      });
      const text = await response.text();
      for (const secret of [env.openaiKey, projectKey, env.adminKey, env.turnSecret]) {
        assert.ok(!text.includes(secret), `a secret in the answer to ${path}`);
      }
      return { status: response.status, body: JSON.parse(text) as Record<string, unknown>, headers: response.headers };
    };

    test("a session for the browser, ended; the limits as HTTP answers", async () => {
      const created = await post("/api/realtime-session", JSON.stringify({ voice: "echo" }), { "x-user-id": "jane" });
      assert.equal(created.status, 200, JSON.stringify(created.body));
      const session = created.body as { ephemeralToken: string; expiresAt: string; iceServers: { urls: string[]; username?: string }[]; sessionId: string };
      assert.ok(session.ephemeralToken.startsWith("ek_"));
      assert.ok(session.sessionId.startsWith("ses_"));
      assert.ok(Date.parse(session.expiresAt) > env.now * 1000);
      assert.deepEqual(session.iceServers[0], { urls: env.stunUris });
      assert.equal(session.iceServers[1]!.username, `${env.now + 3600}:${project}/jane`);

      const crowded = await post("/api/realtime-session", "{}");
      assert.deepEqual([crowded.status, crowded.body], [429, { error: "concurrent_limit_exceeded", current: 1, max: 1 }]);

      const ended = await post(`/api/realtime-session/${session.sessionId}/end`);
      assert.deepEqual([ended.status, ended.body], [200, { sessionId: session.sessionId, ended: true }]);
      const again = await post(`/api/realtime-session/${session.sessionId}/end`);
      assert.deepEqual([again.status, again.body], [404, { error: "session_not_found" }]);

      const second = await post("/api/realtime-session");
      assert.equal(second.status, 200, JSON.stringify(second.body));
      await post(`/api/realtime-session/${String(second.body.sessionId)}/end`);
      const spent = await post("/api/realtime-session", "{}");
      assert.equal(spent.status, 402);
      assert.deepEqual(spent.body.usage, { plan: "free", sessionsIncluded: 2, sessionsUsed: 2, sessionsRemaining: 0 });
    });

    test("bad input from the browser is a 400 naming the field, never a 500", async () => {
      const badUser = await post("/api/realtime-session", "{}", { "x-user-id": "jane:admin" });
      assert.equal(badUser.status, 400);
      assert.deepEqual((badUser.body.fields as { field: string }[]).map((f) => f.field), ["user_id"]);
      const notJson = await post("/api/realtime-session", "{voice");
      assert.deepEqual([notJson.status, notJson.body], [400, { error: "invalid_json" }]);
      const notString = await post("/api/realtime-session", JSON.stringify({ voice: 7 }));
      assert.equal(notString.status, 400);
      const oddId = await post(`/api/realtime-session/${encodeURIComponent("../../x")}/end`);
      assert.equal(oddId.status, 404);
    });
  });
}

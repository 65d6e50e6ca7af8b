/**
 * What the client does when the server misbehaves, over both protocols: retries (UNAVAILABLE only,
 * only where safe), deadlines and cancellation. Local stand-ins play the server: a Connect
 * endpoint that answers UNAVAILABLE a given number of times, and a socket that never answers.
 */

import { create, toBinary } from "@bufbuild/protobuf";
import assert from "node:assert/strict";
import * as http from "node:http";
import * as net from "node:net";
import { after, before, describe, test } from "node:test";
import {
  CancelledError,
  DeadlineExceededError,
  IcegateClient,
  IssueTurnCredentialsResponseSchema,
  RETRY_POLICY,
  UnavailableError,
} from "@icegate/client";

/** A Connect server whose every method fails UNAVAILABLE `failures` times, then answers an empty credential. */
class FlakyConnectServer {
  readonly paths: string[] = [];
  failures = 0;
  readonly #server = http.createServer((request, response) => {
    this.paths.push(request.url ?? "");
    request.resume();
    request.on("end", () => {
      if (this.failures > 0) {
        this.failures--;
        response.writeHead(503, { "content-type": "application/json" });
        response.end(JSON.stringify({ code: "unavailable", message: "try again" }));
        return;
      }
      response.writeHead(200, { "content-type": "application/proto" });
      response.end(toBinary(IssueTurnCredentialsResponseSchema, create(IssueTurnCredentialsResponseSchema, { username: "1:p/u" })));
    });
  });

  async start(): Promise<string> {
    await new Promise<void>((resolve) => this.#server.listen(0, "127.0.0.1", resolve));
    return `http://127.0.0.1:${(this.#server.address() as net.AddressInfo).port}`;
  }

  stop(): Promise<void> {
    this.#server.closeAllConnections();
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }
}

describe("retries", () => {
  const flaky = new FlakyConnectServer();
  let client: IcegateClient;
  before(async () => {
    client = new IcegateClient({ target: await flaky.start(), apiKey: "igk_test" });
  });
  after(async () => {
    client.close();
    await flaky.stop();
  });

  test("UNAVAILABLE is retried for credentials and usage, up to the policy's attempts", async () => {
    flaky.paths.length = 0;
    flaky.failures = RETRY_POLICY.maxAttempts - 1;
    const issued = await client.issueTurnCredentials("u");
    assert.equal(issued.username, "1:p/u");
    assert.equal(flaky.paths.length, RETRY_POLICY.maxAttempts);

    flaky.paths.length = 0;
    flaky.failures = RETRY_POLICY.maxAttempts;
    await assert.rejects(client.getUsage(), UnavailableError);
    assert.equal(flaky.paths.length, RETRY_POLICY.maxAttempts);
    assert.ok(flaky.paths.every((path) => path === "/icegate.v1.UsageService/GetUsage"));
    flaky.failures = 0;
  });

  test("a session is never retried: a retry could create a second one", async () => {
    flaky.paths.length = 0;
    flaky.failures = 1;
    await assert.rejects(client.createSession("openai"), UnavailableError);
    assert.deepEqual(flaky.paths, ["/icegate.v1.SessionService/CreateSession"]);
  });
});

describe("deadlines and cancellation", () => {
  // Accepts connections and reads, never answers.
  const silent = net.createServer((socket) => socket.resume());
  let port = 0;
  before(async () => {
    await new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve));
    port = (silent.address() as net.AddressInfo).port;
  });
  after(() => new Promise<void>((resolve) => silent.close(() => resolve())));

  for (const protocol of ["grpc", "connect"] as const) {
    test(`over ${protocol}, a call past its deadline is a DeadlineExceededError; an aborted one a CancelledError`, async () => {
      const target = protocol === "grpc" ? `127.0.0.1:${port}` : `http://127.0.0.1:${port}`;
      const client = new IcegateClient({ target, apiKey: "igk_test", defaultTimeoutMs: 200 });
      try {
        await assert.rejects(client.issueTurnCredentials("u"), DeadlineExceededError);
        await assert.rejects(client.getIceServers("u", { timeoutMs: 100 }), DeadlineExceededError);
        const controller = new AbortController();
        const call = client.issueTurnCredentials("u", { signal: controller.signal, timeoutMs: 10_000 });
        setTimeout(() => controller.abort(), 50);
        await assert.rejects(call, CancelledError);
      } finally {
        client.close();
      }
    });
  }
});

/** Mutual TLS on both transports: a mapped client certificate stands for a key; anything else is refused. */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";
import { ConfigurationError, IcegateClient, IcegateError, type TlsOptions } from "@icegate/client";
import { env } from "./environment.js";

const pem = (path: string) => readFileSync(path);
const { mtls } = env;

for (const protocol of ["grpc", "connect"] as const) {
  describe(`mutual TLS over ${protocol}`, () => {
    const target = protocol === "grpc" ? mtls.grpcTarget : mtls.httpUrl;
    const open = async (tls: TlsOptions | undefined, apiKey?: string) => {
      const client = new IcegateClient({ target, ...(apiKey ? { apiKey } : {}), ...(tls ? { tls } : {}), defaultTimeoutMs: 5000 });
      try {
        return await client.issueTurnCredentials("kim", { ttlSeconds: 600 });
      } finally {
        client.close();
      }
    };

    test("a client certificate the server maps acts for its project, with no key", async () => {
      const issued = await open({ ca: pem(mtls.ca), cert: pem(mtls.cert), key: pem(mtls.key) });
      assert.equal(issued.username, `${env.now + 600}:default/kim`);
    });

    test("the ICEGATE_TLS_* files stand in for the option", async () => {
      Object.assign(process.env, { ICEGATE_TLS_CA: mtls.ca, ICEGATE_TLS_CERT: mtls.cert, ICEGATE_TLS_KEY: mtls.key });
      try {
        assert.equal((await open(undefined)).username, `${env.now + 600}:default/kim`);
      } finally {
        for (const name of ["ICEGATE_TLS_CA", "ICEGATE_TLS_CERT", "ICEGATE_TLS_KEY"]) delete process.env[name];
      }
    });

    test("no certificate, one from another CA, or no trust in the server's CA: no call gets through", async () => {
      for (const tls of [
        { ca: pem(mtls.ca) },
        { ca: pem(mtls.ca), cert: pem(mtls.strangerCert), key: pem(mtls.strangerKey) },
        { cert: pem(mtls.cert), key: pem(mtls.key) },
      ]) {
        await assert.rejects(open(tls, env.adminKey), IcegateError);
      }
    });

    test("a certificate without its key, or a file that cannot be read, is a ConfigurationError", () => {
      assert.throws(() => new IcegateClient({ target, tls: { ca: pem(mtls.ca), cert: pem(mtls.cert) } }), ConfigurationError);
      process.env.ICEGATE_TLS_CA = "/nonexistent/ca.pem";
      try {
        assert.throws(() => new IcegateClient({ target, apiKey: "k" }), /cannot read the CA file "\/nonexistent\/ca.pem": ENOENT/);
      } finally {
        delete process.env.ICEGATE_TLS_CA;
      }
    });
  });
}

test("TLS settings with an http:// target are refused, not ignored", () => {
  assert.throws(() => new IcegateClient({ target: "http://127.0.0.1:1", apiKey: "k", tls: { ca: "x" } }), ConfigurationError);
});

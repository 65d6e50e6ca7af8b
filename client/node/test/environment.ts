/** What tests/integration/test_node_client.py tells the suite about the server it started. */

function required(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run this suite through tests/integration/test_node_client.py`);
  return value;
}

export interface PythonClientContract {
  /** Wire reason -> the Python class and its IcegateError ancestors, nearest first. */
  byReason: Record<string, string[]>;
  /** gRPC status code name -> lineage, for answers without a known reason. */
  byCode: Record<string, string[]>;
  /** UPSTREAM_UNAVAILABLE with DEADLINE_EXCEEDED. */
  upstreamTimeout: string[];
  /** icegate.error_metadata's constants. */
  errorMetadata: Record<string, string>;
}

export const env = {
  grpcTarget: required("ICEGATE_TEST_GRPC_TARGET"),
  httpUrl: required("ICEGATE_TEST_HTTP_URL"),
  adminKey: required("ICEGATE_TEST_ADMIN_KEY"),
  turnSecret: required("ICEGATE_TEST_TURN_SECRET"),
  openaiKey: required("ICEGATE_TEST_OPENAI_KEY"),
  now: Number(required("ICEGATE_TEST_NOW")),
  turnUris: required("ICEGATE_TEST_TURN_URIS").split(","),
  stunUris: required("ICEGATE_TEST_STUN_URIS").split(","),
  python: JSON.parse(required("ICEGATE_TEST_PYTHON_CLIENT")) as PythonClientContract,
  /** A second server with mutual TLS on both transports; client certificate node.internal acts for `default`. */
  mtls: {
    grpcTarget: required("ICEGATE_TEST_MTLS_GRPC_TARGET"),
    httpUrl: required("ICEGATE_TEST_MTLS_HTTP_URL"),
    /** PEM file paths. */
    ca: required("ICEGATE_TEST_TLS_CA"),
    cert: required("ICEGATE_TEST_TLS_CERT"),
    key: required("ICEGATE_TEST_TLS_KEY"),
    strangerCert: required("ICEGATE_TEST_TLS_STRANGER_CERT"),
    strangerKey: required("ICEGATE_TEST_TLS_STRANGER_KEY"),
  },
};

/** Both transports, as a caller chooses them: a gRPC host:port, or the Connect URL. */
export const TRANSPORTS = [
  { name: "grpc", target: env.grpcTarget },
  { name: "connect", target: env.httpUrl },
] as const;

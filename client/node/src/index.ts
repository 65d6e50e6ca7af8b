/**
 * icegate's Node/TypeScript client: `IcegateClient` (gRPC or Connect), its typed errors, and the
 * messages generated from protos/icegate/v1 by `make proto`.
 */

export {
  ConfigurationError,
  DEFAULT_TARGET,
  DEFAULT_TIMEOUT_MS,
  IcegateClient,
  isHttpTarget,
  providerValue,
  RETRY_POLICY,
  RETRYING_SERVICES,
  type CallOptionsLike,
  type IcegateClientOptions,
  type ProjectFields,
  type ProviderName,
  type SessionOptionsInit,
  type TlsOptions,
  type TypedClient,
} from "./client.js";
export * from "./errors.js";
export { ErrorMetadata } from "./errorMetadata.js";
export { rtcIceServers, type RtcIceServer } from "./iceServers.js";
export * from "./gen/icegate/v1/admin_pb.js";
export * from "./gen/icegate/v1/credentials_pb.js";
export * from "./gen/icegate/v1/errors_pb.js";
export * from "./gen/icegate/v1/sessions_pb.js";
export * from "./gen/icegate/v1/usage_pb.js";

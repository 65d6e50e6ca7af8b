"""The transports icegate serves its one contract on: gRPC (grpc.aio) and Connect (HTTP)."""

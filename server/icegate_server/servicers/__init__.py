"""Thin gRPC servicers: unpack the request, call domain code, pack the response."""

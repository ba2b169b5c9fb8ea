"""What crosses between edge and cloud, and how it travels: bytes only.

- `protocol`: the message format (versioned header, CRC, validation before any state changes);
- `codec`: how hidden states become a message's payload (lossless, 16-bit casts, int8 codes);
- `local`: the `Link` interface and `LocalLink`, both sides in one process;
- `grpc_link`: `GrpcLink`, the same interface over the network to a cloud server (src/serve/cloud_server.py).
"""

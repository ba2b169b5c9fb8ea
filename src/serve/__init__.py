"""The two sides as services.

- `cloud_server`: the cloud as a gRPC service for many edges, every request bounded in size, time
  and memory; `batching` runs concurrent sessions' layers together, `panels` (with `panel_gemm.c`)
  lays a batching server's fp32 weights out for that;
- `edge_server`: the edge as an OpenAI-compatible HTTP server with its page: `app` (routes), `api`
  (request checks), `engine` (the adapter to the decoding API), `static/` (the page).
"""

"""The two sides as services.

- `cloud_server`: the cloud as a gRPC service for many edges, every request bounded in size, time
  and memory; `batching` runs concurrent sessions' layers together, over weights laid out as
  panels (`src/panels.py`) where they can be;
- `edge_server`: the edge as an OpenAI-compatible HTTP server with its page: `app` (routes), `api`
  (request checks), `engine` (the adapter to the decoding API), `static/` (the page).
"""

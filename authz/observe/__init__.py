"""The observability half: what is recorded of each decision, and who reads it.

Layers, top to bottom (an import-linter contract in pyproject.toml keeps
them: a module imports only from layers below it):

- pooled: one pod's metrics and decisions across `serve --workers`
- admin: the admin HTTP endpoint (routes, streams)
- recorder | spans | httpserve: the recording thread; spans off-process;
  the bounded HTTP server
- decisionlog | query | ring: the log line's schema and renderer; decision
  filters; the fair ring buffer and its live subscribers
- bounded | metrics: record size caps; the Prometheus metrics

The Check path (authz/envoy/server.py) sees only `authz.records.Recorder`.
"""

"""The decision viewer: a static page served by the admin endpoint, and the
few read-only routes it needs beyond `/v1/decisions` (docs/tracing.md, "The page").

Nothing here is on the Check path: it reads the recorder's ring, like the rest
of the admin endpoint, and renders with the same functions as the CLI.
"""

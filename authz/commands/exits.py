"""Exit codes of every `egress-authz` command: one table, documented in the README.

Scripts branch on these, so they are a public contract, like reason codes.
"""

from __future__ import annotations

OK = 0  # allowed (or audit), policies valid, the answer printed
NO = 1  # a negative answer or a failure while running: denied, lint found nothing to
#         check, a decision not recorded, the server unreachable, demo verdicts off
USAGE = 2  # usage or policy errors: bad flags or values, a path that does not exist,
#            a policy that fails validation
INTERRUPTED = 130  # Ctrl-C


class UsageError(Exception):
    """A bad flag value found after parsing; printed with the command's usage, exit 2."""

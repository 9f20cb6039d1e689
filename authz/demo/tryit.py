"""What `egress-authz demo --keep-running` prints: commands to try by hand."""

from __future__ import annotations

from .stack import DemoStack


def instructions(stack: DemoStack) -> str:
    return f"policies: {stack.policy_dir}"

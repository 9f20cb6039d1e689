"""Fixtures that several test modules share; pytest finds them here by name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def chart_gateways() -> Iterator[list[dict[str, Any]]]:
    """The Gateway(s) the chart installs, next to what the service writes."""
    import helm_python as helm  # only the modules that ask for the chart pay for it

    with helm.Chart.load(ROOT / "charts" / "egress-authz") as chart:
        manifests = chart.render(name="egress-authz", namespace="egress-authz")
    yield [doc for path, text in manifests.items() if not path.endswith("NOTES.txt")
           for doc in yaml.safe_load_all(text) if doc and doc["kind"] == "Gateway"]

from __future__ import annotations

import pytest

from tests.harness import Flow, MemorySession

RUNTIMES = ["memory"]


@pytest.fixture(params=RUNTIMES)
def flow(request: pytest.FixtureRequest):
    f = Flow(request.param, MemorySession)
    yield f
    f.close()

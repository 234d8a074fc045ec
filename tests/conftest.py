from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from tests.harness import ArqSession, Flow, MemorySession
from tests.redis_server import RedisServer, test_redis_url

RUNTIMES = ["memory", "arq"]

# Subprocesses (the real `flowcraft` CLI, worker processes) must run the checkout under test, not whatever
# `pip install -e` points at (a second worktree would otherwise test the first one's code).
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server this session started (never the one on 127.0.0.1:6379)."""
    given = test_redis_url()
    if given:
        yield given
        return
    server = RedisServer()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def redis_sync(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(params=RUNTIMES)
def flow(request: pytest.FixtureRequest):
    if request.param == "arq":
        url = request.getfixturevalue("redis_url")
        import redis

        redis.Redis.from_url(url).flushdb()
        f = Flow("arq", functools.partial(ArqSession, url=url))
    else:
        f = Flow("memory", MemorySession)
    yield f
    f.close()


def pytest_report_header(config):
    return f"flowcraft test redis: {os.environ.get('FLOWCRAFT_TEST_REDIS_URL') or 'redis-server started by the session'}"

"""A real redis-server for the test session, on a unix socket in a temp dir (or FLOWCRAFT_TEST_REDIS_URL)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


class RedisServer:
    def __init__(self, *, appendonly: bool = False, extra: list[str] | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH: install it (apt-get install -y redis-server)")
        self.dir = Path(tempfile.mkdtemp(prefix="flowcraft-redis-"))
        self.socket = self.dir / "redis.sock"
        self.args = [exe, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                     "--dir", str(self.dir), "--save", "", "--appendonly", "yes" if appendonly else "no",
                     "--logfile", str(self.dir / "redis.log"), *(extra or [])]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        if self.socket.exists():
            self.socket.unlink()
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text() if (self.dir / "redis.log").exists() else ""
                raise RuntimeError(f"redis-server did not start: {log[-2000:]}")
            time.sleep(0.01)

    def stop(self, sig: int | None = None) -> None:
        if self.proc and self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            self.proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_redis_url() -> str | None:
    return os.environ.get("FLOWCRAFT_TEST_REDIS_URL") or None


test_redis_url.__test__ = False  # type: ignore[attr-defined]

"""Store faults under load (issue 10): the store goes away, requests keep coming.

* Redis (AOF on, ``appendfsync always``) shut down and started again on the same port and
  data directory while clients send signed telemetry: 503 during the outage, never a 202;
  202 again after it; every 202 is in the store afterwards and every accepted request
  replayed across the restart is refused 409. A restart *with* its AOF is not amnesia
  (gateway/store/redis_epoch.py): the epoch survives, nothing is refused for it.
* SQLite disk full (tests/integration/test_store_disk_full.py) and locked
  (tests/integration/test_error_bodies.py, and the load variant below).

Recovery times are printed (``-s``) and written down in docs/RESILIENCE.md.
"""

from __future__ import annotations

import signal
import sqlite3
import time

import pytest
from conftest import RedisServer
from stack import Stack
from traffic import Traffic, check_nothing_lost

STORE_503 = {"replay_store_unavailable", "store_unavailable"}


@pytest.fixture
def redis(tmp_path, redis_server) -> RedisServer:
    """A redis-server of this test's own, restarted by it (AOF, fsync always)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    server.provision()
    yield server
    server.stop()


def refusals(traffic: Traffic) -> set:
    return {s.error for s in traffic.with_status(503)}


@pytest.mark.redis
@pytest.mark.parametrize("how", ["SHUTDOWN", "SIGKILL"])
async def test_redis_restarted_under_load_loses_nothing_and_accepts_no_replay(
        tmp_path, redis, how):
    (tmp_path / "gw").mkdir()
    stack = Stack(tmp_path / "gw", redis.url)
    stack.spawn()
    try:
        await stack.wait_ready()
        traffic = Traffic(stack, clients=4)
        traffic.start()
        await traffic.until(lambda t: len(t.with_status(202)) >= 40)
        if how == "SHUTDOWN":
            redis.stop()  # SIGTERM: redis fsyncs its AOF and exits
        else:  # no shutdown path: only what appendfsync always already wrote
            redis.proc.send_signal(signal.SIGKILL)
            redis.proc.wait()
            redis.proc = None
        down = time.monotonic()
        await traffic.until(lambda t: t.first(503, down) is not None
                            and len([s for s in t.sent if s.started > down]) >= 20)
        redis.start()  # same port, same --dir: it loads its AOF
        back = time.monotonic()
        await traffic.until(lambda t: t.since(202, back) >= 40)
        await traffic.stop()
        outage = [s for s in traffic.sent if down <= s.started and s.done <= back]
        assert outage and {s.status for s in outage} == {503}, traffic.counts()
        assert set(traffic.counts()) <= {202, 503}, traffic.counts()
        assert refusals(traffic) <= STORE_503, refusals(traffic)
        recovery = traffic.first(202, back).done - back
        figures = await check_nothing_lost(stack, traffic, [stack.audit_path],
                                           lost_replies=True)
        print(f"redis restart ({how}):", figures, f"503 during outage: {len(outage)}",
              f"recovery (redis up -> first 202): {recovery:.3f} s")
        assert figures["lost"] == figures["half_written"] == 0
    finally:
        stack.kill_all()


async def test_sqlite_locked_under_load_is_503_never_202(tmp_path):
    """Another connection holds the write lock past busy_timeout_ms while clients send:
    503 replay_store_unavailable while it is held, 202 again after, nothing lost."""
    (tmp_path / "gw").mkdir()
    url = f"sqlite:///{tmp_path / 'gw' / 'fedgate.db'}"
    stack = Stack(tmp_path / "gw", url)
    stack.config_path.write_text(stack.config_path.read_text().replace(
        f'url = "{url}"', f'url = "{url}"\nbusy_timeout_ms = 200'))
    stack.spawn()
    try:
        await stack.wait_ready()
        traffic = Traffic(stack, clients=4)
        traffic.start()
        await traffic.until(lambda t: len(t.with_status(202)) >= 20)
        blocker = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        locked = time.monotonic()
        await traffic.until(lambda t: t.since(503, locked) >= 10)
        blocker.execute("ROLLBACK")
        blocker.close()
        free = time.monotonic()
        await traffic.until(lambda t: t.since(202, free) >= 20)
        await traffic.stop()
        held = [s for s in traffic.sent if locked <= s.started and s.done <= free]
        assert held and {s.status for s in held} == {503}
        assert set(traffic.counts()) <= {202, 503}, traffic.counts()
        assert refusals(traffic) == {"replay_store_unavailable"}
        recovery = traffic.first(202, free).done - free
        figures = await check_nothing_lost(stack, traffic, [stack.audit_path])
        print("sqlite locked:", figures, f"503 while locked: {len(held)}",
              f"recovery (lock released -> first 202): {recovery:.3f} s")
    finally:
        stack.kill_all()

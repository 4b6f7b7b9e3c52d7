"""bench/stage_bench.py still runs the gateway's own stages end to end (it calls
internals: a refactor that breaks it should fail here, not in the next `make bench`).
No figure is asserted: only that every stage ran and was measured."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import stage_bench  # noqa: E402


async def test_every_stage_is_measured_for_both_routes(redis_url, tmp_path):
    got = await stage_bench.measure(redis_url, tmp_path, rounds=1)
    assert set(got) == {"single", "batch"}
    always = [stage_bench.STAGES[k] for k in (1, 2, 4, 5, 6, 8)]  # work on every event
    for route, stages in got.items():
        assert list(stages) == list(stage_bench.STAGES)
        assert all(us >= 0 for us in stages.values())
        for stage in always:  # a stage that silently stopped running would read 0
            assert stages[stage] > 0, (route, stage)
    assert got["single"][stage_bench.STAGES[0]] == 0  # no envelope on the single route
    assert got["batch"][stage_bench.STAGES[0]] > 0

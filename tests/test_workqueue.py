"""The work queue across processes: a worker killed with SIGKILL loses no job."""

from __future__ import annotations

import re

import pytest

from netchan.cli.workqueue import run_workqueue


@pytest.mark.async_timeout(90)
async def test_killed_worker_process_loses_no_job(capsys):
    # long jobs: the killed worker is holding one when it dies
    code = await run_workqueue(jobs=60, workers=2, cut_every=0.5, rounds=10, pause=0.05, kill_at=0.3,
                               deadline=60)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "jobs lost          0" in out
    assert "60 correct, 0 wrong" in out
    requeued = int(re.search(r"\((\d+) requeued\)", out).group(1))
    assert requeued >= 1, out  # the dead worker's job went back and was done by the other


@pytest.mark.async_timeout(150)
async def test_20000_jobs_through_a_cutting_proxy_with_random_worker_kills(capsys):
    code = await run_workqueue(jobs=20000, workers=4, cut_every=(0.5, 2.0), rounds=1, pause=0.0,
                               kill_at=0.15, kills=3, seed=5, deadline=120)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "jobs lost          0" in out
    assert "20000 correct, 0 wrong" in out
    assert "workers killed     3" in out
    cuts = int(re.search(r"TCP cuts survived\s+(\d+)", out).group(1))
    assert cuts >= 1, out

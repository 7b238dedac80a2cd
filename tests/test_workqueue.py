"""The work queue across processes: a worker killed with SIGKILL loses no job."""

from __future__ import annotations

import re

import pytest

from netchan.workqueue import run_workqueue


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

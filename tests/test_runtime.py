"""What every stage shares at run time: the collective timeout a frozen rank runs into."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import two_process_launch

ROOT = Path(__file__).resolve().parents[1]

# Rank 1 freezes (sleeps far past the timeout); rank 0 waits for it at a barrier, as RAFT's stages do.
FROZEN_RANK = """
import time
from types import SimpleNamespace
from hhrm import runtime

state = runtime.process_state(SimpleNamespace(ddp_timeout=5))
if state.process_index == 1:
    time.sleep(300)
state.wait_for_everyone()
"""


def test_a_frozen_rank_fails_the_run_after_ddp_timeout(tmp_path):
    script = tmp_path / "frozen_rank.py"
    script.write_text(FROZEN_RANK)
    cmd = two_process_launch(str(script))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=250)
    seconds = time.perf_counter() - start
    assert proc.returncode != 0
    # gloo's default would hold rank 0 for 30 minutes; with ddp_timeout=5 the run ends well before rank 1 wakes.
    assert seconds < 200, seconds
    assert "timed out" in (proc.stdout + proc.stderr).lower() or "timeout" in (proc.stdout + proc.stderr).lower()

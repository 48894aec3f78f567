"""``benchmarks/step_profile.py`` at toy sizes: its table is produced, and GECO's per-step op counts
are the README's (30 in the objective, 72 in the callback for the PI default; 3 + 0 for the ELBO;
the whole step a few more).

A behaviour test, not a timing test: the timings at these sizes mean nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_step_profile_prints_its_table_with_the_op_counts_the_readme_states():
    command = [
        sys.executable, str(REPO / "benchmarks" / "step_profile.py"), "--image-size", "16", "--batch-size", "4",
        "--steps", "3", "--warmup", "2", "--op-steps", "2", "--variants", "elbo", "geco_pi",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        cells[0]: cells[1:]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| variant")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == {"elbo", "geco_pi"}
    for cells in rows.values():
        assert float(cells[0]) > 0 and float(cells[1]) > 0  # ms per step, objective host ms
    assert rows["elbo"][3:5] == ["3", "0"]
    assert rows["geco_pi"][3:5] == ["30", "72"]
    # The whole step: GECO's objective and callback plus the few ops it adds elsewhere (its
    # backward nodes, the optimizer's skip flag); no device columns on the CPU.
    objective_ops, callback_ops, elbo_ops, elsewhere_at_most = 30, 72, 3, 10
    added = float(rows["geco_pi"][5]) - float(rows["elbo"][5])
    counted = objective_ops + callback_ops - elbo_ops
    assert counted <= added <= counted + elsewhere_at_most, added
    assert rows["elbo"][6:] == rows["geco_pi"][6:] == ["-", "-"]
    assert re.search(r"geco_pi: its own host work [0-9.]+ ms per step = [0-9.]+ % of the ELBO's step", done.stdout)
    assert re.search(r"the same calls in a tight loop [0-9.]+ ms \([0-9.]+x less\)", done.stdout)

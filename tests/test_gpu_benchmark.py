"""``benchmarks/gpu.py --cpu-smoke``: every row of the GPU benchmark's table runs and reads sensibly.

A behaviour test, not a timing test: the smoke's sizes are tiny and its numbers mean nothing;
what is checked is that each section produces its rows with finite positive numbers, so the
one prepared run on a GPU machine does not discover a broken row.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_geco.metrics import compiler_available

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["benchmark", "precision", "median", "unit", "spread (min - max over rounds)", "peak MiB", "note"]
PRECISIONS = ("fp32", "bf16-mixed")
# (benchmark label, precision) of every row that must hold numbers.
COMPILED_GECO = ["Lightning + GECO, compiled update", "GECO compiled / ELBO (images/s)", "GECO compiled / plain (images/s)"]
CHANNELS_LAST = ["Lightning + GECO, channels_last model", "GECO channels_last / GECO (images/s)"]
EXPECTED = (
    [(label, p) for p in PRECISIONS for label in ("plain PyTorch loop", "Lightning + ELBO", "Lightning + GECO")]
    + [(label, p) for p in PRECISIONS for label in ("GECO / ELBO (images/s)", "GECO / plain (images/s)")]
    + [(label, p) for p in PRECISIONS for label in COMPILED_GECO]
    + [(label, p) for p in PRECISIONS for label in CHANNELS_LAST]
    + [("DDP 2 processes (gloo, CPU smoke), Lightning + GECO", "fp32")]
    + [
        (f"torch.compile{what}: {variant}", "fp32")
        for variant in ("plain PyTorch loop", "Lightning + GECO")
        for what in ("", " speed-up", " time")
    ]
)
KL = "marginal KL compute (N=500, d=10)"


def _table(text: str) -> dict[tuple[str, str], dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == COLUMNS
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(COLUMNS), line
        row = dict(zip(COLUMNS, cells))
        rows[(row["benchmark"], row["precision"])] = row
    return rows


def _check_numbers(key, row: dict[str, str]) -> None:
    median = float(row["median"])  # a "failed: ..." or "skipped: ..." here fails the test, with the reason
    assert math.isfinite(median) and median > 0, (key, row)
    spread = row["spread (min - max over rounds)"]
    if spread != "n=1":
        match = re.match(r"(\S+) - (\S+) \(", spread)
        assert match, (key, spread)
        low, high = float(match.group(1)), float(match.group(2))
        assert 0 < low <= high and math.isfinite(high), (key, spread)
        # The median is printed rounded to 3 significant figures.
        assert low * 0.99 <= median <= high * 1.01, (key, row)
    assert row["peak MiB"] == "n/a", (key, row)  # not measured on CPU


@pytest.mark.timeout(420)
def test_cpu_smoke_fills_every_row(tmp_path):
    out = tmp_path / "nested" / "gpu.md"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--cpu-smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.strip() in done.stdout  # the file is what was printed
    assert "- device: CPU" in text and "pytorch-lightning" in text and "torch " in text
    rows = _table(text)

    for key in EXPECTED:
        assert key in rows, f"missing row {key}; rows: {sorted(rows)}"
        if key[0] in COMPILED_GECO and not compiler_available("cpu"):
            assert rows[key]["median"].startswith("skipped:"), rows[key]
            continue
        _check_numbers(key, rows[key])

    # The marginal KL: eager (or compile=False when the class takes a compile argument) always;
    # compile=True measured or, without the argument, skipped saying so.
    kl = {name: row for (name, _), row in rows.items() if name.startswith(KL)}
    eager = kl.get(f"{KL}, eager") or kl.get(f"{KL}, compile=False")
    assert eager is not None, sorted(kl)
    _check_numbers(KL, eager)
    compiled = kl[f"{KL}, compile=True"]
    if f"{KL}, compile=False" in kl:
        _check_numbers(KL, compiled)
    else:
        assert compiled["median"].startswith("skipped: AggregatePosteriorKL takes no compile argument")

    # Nothing unexpected: every row is one of the above.
    assert len(rows) == len(EXPECTED) + len(kl), sorted(rows)


def test_every_benchmark_script_loads_from_anywhere(tmp_path):
    # `python benchmarks/X.py` puts benchmarks/ first on sys.path, not the repository root, so a
    # script that imports the top-level datamodules must put the root there itself. Loading each
    # from another folder (the root is then on no path) runs its imports, not its main().
    scripts = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
    # As `python <script>` does: the script's folder first on the path; then the path and the
    # top-level modules it imported are put back, so one script's imports never serve the next.
    code = (
        "import os, runpy, sys\n"
        "for path in sys.argv[1:]:\n"
        "    saved, modules = list(sys.path), set(sys.modules)\n"
        "    sys.path.insert(0, os.path.dirname(path))\n"
        "    runpy.run_path(path, run_name='loaded')\n"
        "    sys.path[:] = saved\n"
        "    for name in set(sys.modules) - modules:\n"
        "        if name.split('.')[0] not in ('torch', 'pytorch_lightning', 'lightning_geco', 'lightning_fabric', 'torchmetrics', 'torchvision', 'yaml', 'numpy'):\n"
        "            del sys.modules[name]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *scripts], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

"""The README's Python snippet runs as written (made small: fewer steps and images)."""

import re
from pathlib import Path

from lightning_geco.verdict import within_noise

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet(section: str) -> str:
    text = README.read_text()
    start = text.index(section)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_plain_trainer_snippet_trains_and_prints_a_verdict(tmp_path, monkeypatch, capsys):
    code = _snippet("## From Python, with a plain Lightning Trainer")
    small = {
        "ShapesDataModule(image_size=64, batch_size=64)": "ShapesDataModule(image_size=64, batch_size=8, num_train=32, num_val=8)",
        "pl.Trainer(max_steps=1500,": "pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,",
    }
    for old, new in small.items():
        assert old in code, f"the README snippet no longer contains {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("GECO: ") and "distortion" in printed[-1]


def _run_as_written(section: str, tmp_path, monkeypatch, capsys) -> tuple[str, dict]:
    """Run the README's snippet under ``section`` in ``tmp_path``: (its last printed line, its summary)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_snippet(section), "README.md", "exec"), namespace)
    return capsys.readouterr().out.strip().splitlines()[-1], namespace["summary"].summary


def test_the_bring_your_own_model_example_meets_its_tolerance(tmp_path, monkeypatch, capsys):
    printed, summary = _run_as_written("## Bring your own model", tmp_path, monkeypatch, capsys)
    assert printed.startswith("GECO: distortion ")
    assert summary["verdict"] == "met" and summary["tolerance"] == 0.5
    # The README's figure: 0.2 % under after the model learned at once far under the tolerance
    # (the fast release; with the clip alone 11.4 % under), validated at the last step.
    assert -0.02 < summary["relative_violation"] <= 0.01
    assert summary["validated_step"] == summary["global_step"] == 1500
    # The snippet logs the reading's standard error (MeanWithStandardError), which the line shows
    # where the verdict lies within two of them of the 1 % band's edge, as here.
    assert summary["standard_error"] > 0 and " ± " in printed


def test_the_own_constraint_example_ends_on_its_tolerance_within_its_noise(tmp_path, monkeypatch, capsys):
    printed, summary = _run_as_written("**A constraint of your own**", tmp_path, monkeypatch, capsys)
    assert summary["reading"] == "coarse_mse" and summary["tolerance"] == 0.002
    # The README's figure: +1.7 % ± 3.1 % at seed 0, NOT MET by less than one standard error of
    # its 512-image validation mean (the snippet logs it), so the line shows the noise. Another
    # CPU or torch build may land a little either side of the 1 % band; the test holds the line
    # to what the README says of it: near the tolerance, within its noise, and the verdict that
    # follows from the reading.
    relative_violation = summary["relative_violation"]
    standard_error = summary["standard_error"] / summary["tolerance"]
    assert -0.05 < relative_violation < 0.03 and 0.02 < standard_error < 0.05
    assert within_noise(relative_violation, standard_error) and " ± " in printed
    assert summary["verdict"] == ("met" if relative_violation <= 0.01 else "not_met")
    assert printed.startswith("GECO: NOT MET: coarse_mse " if relative_violation > 0.01 else "GECO: coarse_mse ")

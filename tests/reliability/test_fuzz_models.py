"""The loading fuzzer on a short budget: every mutated GGUF file and model folder either loads or raises a
ModelLoadError, within the time limit. The long run is a command:
`python -m tests.reliability.fuzz_models --seconds 600` (see its --help)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.fuzz_models import fuzz


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in mutated weights
def test_mutated_models_load_or_raise_model_load_error(tmp_path: Path) -> None:
    report = fuzz(seconds=25, target="all", seed=15, out=tmp_path / "findings", log=None)
    assert not report.findings, report.summary()
    # The mutations reach both outcomes, and coverage guidance kept inputs beyond the seeds.
    assert report.loaded > 0 and report.refused > 0 and report.corpus > 7, report.line()

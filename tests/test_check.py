"""`bnlab check`: the table of errors per level, and its exit status."""

import torch
from typer.testing import CliRunner

from bnlab import check
from bnlab.check import TOLERANCE, CheckRow, run_checks
from bnlab.cli import app


def test_every_level_and_dtype_is_checked_and_within_tolerance():
    rows = run_checks(seed=3)
    levels = {row.level for row in rows}
    assert {"reference", "functional", "nn.BatchNorm2d"} <= levels
    cases = " ".join(row.case for row in rows)
    for dtype in ("float64", "float32", "bfloat16", "float16", "offset 1e+06"):
        assert dtype in cases
    assert all(row.ok for row in rows), [row for row in rows if not row.ok]
    # torch's own error at the large offsets is shown, never asserted (README: ~5e-2 at 1e6)
    informational = [r for r in rows if r.informational]
    assert informational and all(r.level.startswith("torch ") for r in informational)
    bnlab_at_1e6 = [r for r in rows if not r.informational and "offset 1e+06: out" in r.case]
    assert len(bnlab_at_1e6) == 2 and all(
        r.vs_truth <= TOLERANCE[torch.float32] for r in bnlab_at_1e6
    )


def test_row_fails_when_torch_or_truth_exceeds_tolerance():
    assert not CheckRow("x", "y", 2e-4, None, 1e-4).ok
    assert not CheckRow("x", "y", 0.0, 2e-4, 1e-4).ok
    assert CheckRow("x", "y", 1.0, None, 1e-4, informational=True).ok


def test_cli_check_exits_zero_and_prints_table():
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 0, result.output
    assert "vs float64 truth" in result.output and "within tolerance" in result.output


def test_cli_check_exits_nonzero_on_excess(monkeypatch):
    monkeypatch.setattr(check, "run_checks", lambda seed: [CheckRow("l", "c", 1.0, None, 1e-4)])
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 1
    assert "exceeded their tolerance" in result.output

"""README facts: its first lines (exactly the two commands a new user runs, both Makefile
targets) and the numerics table (the figures `bnlab check` prints)."""

import re
from pathlib import Path

import torch

from bnlab.check import run_checks

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_make_run_and_make_test():
    text = (ROOT / "README.md").read_text()
    block = re.match(r"```\n(.*?)```", text, re.S)
    assert block, "README.md: expected to open with a code block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["make run", "make test"]
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
    assert {"run", "test", "mutants"} <= set(targets)


def test_numerics_table_holds_what_bnlab_check_measures():
    """The "Numerics" table: bnlab's float32 error at offsets 1e4 and 1e6, as `bnlab check`
    (seed 0) computes it, to the two digits shown; torch's column where the torch is the one
    the table names."""
    text = (ROOT / "README.md").read_text()
    table = re.search(r"\| common offset \| bnlab max error vs float64 \| torch ([\d.]+) max error vs float64 \|\n\|[-|]+\|\n((?:\|.*\|\n)+)", text)  # fmt: skip
    assert table, "README.md: the numerics table is missing"
    rows = {cells[0]: cells[1:] for cells in (line.strip("|").split("|") for line in table.group(2).splitlines())}  # fmt: skip
    rows = {float(k): [c.strip() for c in v] for k, v in rows.items()}
    measured = {
        (row.level, row.case): row.vs_truth
        for row in run_checks(seed=0)
        if row.case.endswith(": out")
    }
    for offset, (ours, theirs) in rows.items():
        case = f"float32, offset {offset:g}: out"
        assert ours == f"{measured[('functional', case)]:.1e}", (offset, ours)
        if torch.__version__.startswith(table.group(1)):
            assert theirs == f"{measured[('torch functional', case)]:.1e}", (offset, theirs)

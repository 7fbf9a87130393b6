"""The README's first lines: exactly the two commands a new user runs, both Makefile targets."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_make_run_and_make_test():
    text = (ROOT / "README.md").read_text()
    block = re.match(r"```\n(.*?)```", text, re.S)
    assert block, "README.md: expected to open with a code block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["make run", "make test"]
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
    assert {"run", "test", "mutants"} <= set(targets)

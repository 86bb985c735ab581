"""The README's install commands: the CPU route comes first, and CI runs the test command exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_cpu_route_comes_before_the_main_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    cpu = [i for i, b in enumerate(blocks) if "download.pytorch.org/whl/cpu" in b]
    demo = [i for i, b in enumerate(blocks) if "histoexp demo" in b]
    assert cpu and demo and cpu[0] < demo[0]  # said up front, one copy-paste line into the same .venv
    line = blocks[cpu[0]]
    assert "\n" not in line and line.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch")
    assert readme.index("without an NVIDIA GPU") < readme.index(blocks[demo[0]])


def test_ci_runs_the_readmes_test_command_without_the_cpu_index():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    (tests_cmd,) = [b for b in blocks if b.endswith("&& pytest")]
    steps = [s.strip() for s in tests_cmd.split("&&")]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    assert steps == ["python3 -m venv .venv", ". .venv/bin/activate", "pip install -e '.[test]'", "pytest"]
    for step in steps:
        assert step in ci  # the same commands, in order
    assert [ci.index(s) for s in steps] == sorted(ci.index(s) for s in steps)
    assert "download.pytorch.org" not in (ROOT / ".ci" / "run").read_text()  # CI never depends on it

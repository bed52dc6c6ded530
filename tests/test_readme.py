"""Every code block of the README runs as written.

```python blocks run here, each in a fresh namespace (so each carries its own imports);
```python torch blocks need a GPU and run in tests/test_torch_device.py; the ```bash
blocks are the commands .ci/run executes (checked below to stay in step); ```text
blocks are program output.
"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
CI = Path(__file__).resolve().parent.parent / ".ci" / "run"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_every_block_has_a_known_kind():
    fences = [line[3:] for line in README.read_text().splitlines() if line.startswith("```")]
    opening = fences[::2]
    assert all(f == "" for f in fences[1::2]) and len(fences) % 2 == 0
    assert set(opening) <= {"python", "python torch", "bash", "text"}, opening


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs_alone(index):
    exec(compile(blocks("python")[index], f"{README}:python block {index}", "exec"), {})


def test_quick_start_commands_are_what_ci_runs():
    quick_start = blocks("bash")[0].strip().splitlines()
    assert quick_start == ['pip install . && kvcore simulate',
                           'pip install -e ".[test]" && python -m pytest']
    ci = CI.read_text()
    assert 'pip install -q -e ".[test]" && python -m pytest -q' in ci
    assert "kvcore simulate --quiet" in ci


def test_engine_example_command_is_what_ci_runs():
    engine = [b.strip() for b in blocks("bash") if "kvcore.examples.engine" in b]
    assert engine == ['pip install -e ".[model]" && python -m kvcore.examples.engine']
    ci = CI.read_text()
    assert 'pip install -q -e ".[model]"' in ci
    assert "\npython -m kvcore.examples.engine\n" in ci

"""The README's Python example and commands stay true."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", README, re.S)  # the onnxruntime one: test_export


def test_python_example_runs():
    (code,) = [block for block in PYTHON if "from cmkit" in block]
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - our own README
    assert namespace["one"].shape == namespace["two"].shape == (16, 2)


def test_test_command_is_what_ci_runs():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in README and "python -m pytest -q" in ci

"""The README's Python examples run, and print what the README says they print (numbers in
scientific notation, which depend on the CPU's instruction set, are compared as placeholders)."""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
NUMBER = re.compile(r"\d+\.\d+e[-+]\d+")


def examples():
    """(code, expected output) for each ```python block followed by a plain ``` block."""
    text = README.read_text()
    found = re.findall(r"```python\n(.*?)```(?:(?!```python).)*?```\n(.*?)```", text, re.S)
    return [(code, expected) for code, expected in found]


def normalized(text):
    return [NUMBER.sub("<num>", line.rstrip()) for line in text.strip().splitlines()]


def test_readme_has_examples():
    assert len(examples()) >= 2


@pytest.mark.parametrize("index", range(len(examples())))
@pytest.mark.slow
def test_readme_example_prints_what_it_says(index):
    code, expected = examples()[index]
    if "transformers" in code or "timm" in code:
        pytest.importorskip("transformers")
        pytest.importorskip("timm")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert normalized(result.stdout) == normalized(expected)

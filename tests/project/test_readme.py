"""The Python examples of README.md and docs/*.md run, and print what the page says they print.

Expected output: the plain ``` block after an example (after an optional "prints ..." line), and
lines annotated in the code, `print(x.shape)  # torch.Size([2, 3])` or `print(x)  # -> text`.
Numbers in scientific notation (errors, which depend on the CPU's instruction set) are compared as
placeholders; the pages print no timings. Not run: `# api:` signature blocks (docs/api.md, checked
by test_api_reference.py) and blocks whose first line is `# not run: <why>`. Every example runs in
one interpreter (each in a fresh namespace), with TRITON_INTERPRET=1 (no GPU here), to keep CI short.
"""

import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README = ROOT / "README.md"
NUMBER = re.compile(r"\d+\.\d+e[-+]\d+")
BLOCK = re.compile(r"```python\n(?P<code>.*?)```\n(?:\n(?:prints[^\n]*\n\n)?```\n(?P<expected>.*?)```\n)?", re.S)
ANNOTATION = re.compile(r"print\(.*\)\s*#\s*(?:-> (?P<text>.*)|(?P<size>torch\.Size\(.*\)))$")
SKIP_MARKERS = ("# api:", "# not run:")

DRIVER = r"""
import contextlib, io, json, sys, traceback
results = []
for code in json.load(sys.stdin):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<docs example>", "exec"), {"__name__": "__docs__"})
        results.append({"stdout": out.getvalue(), "error": None})
    except ModuleNotFoundError as e:
        results.append({"stdout": out.getvalue(), "error": None, "missing": e.name})
    except BaseException:
        results.append({"stdout": out.getvalue(), "error": traceback.format_exc()[-3000:]})
print("\n@@RESULTS@@" + json.dumps(results))
"""


def examples():
    """[(page, index on the page, code, expected lines or None)] of the runnable examples."""
    out = []
    for page in PAGES:
        for i, m in enumerate(BLOCK.finditer(page.read_text())):
            code = m["code"]
            if code.lstrip().startswith(SKIP_MARKERS):
                continue
            expected = m["expected"].strip().splitlines() if m["expected"] is not None else None
            if expected is None:
                notes = [ANNOTATION.search(line.rstrip()) for line in code.splitlines()]
                expected = [n["text"] or n["size"] for n in notes if n] or None
            out.append((page.relative_to(ROOT).as_posix(), i, code, expected))
    return out


@functools.cache
def run_all():
    """Run every example in one interpreter; {(page, index): result}."""
    cases = examples()
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("BMK_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps([code for _, _, code, _ in cases]),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
    )
    assert "@@RESULTS@@" in proc.stdout, proc.stderr[-3000:]
    results = json.loads(proc.stdout.rsplit("@@RESULTS@@", 1)[1])
    return {(page, i): r for (page, i, _, _), r in zip(cases, results, strict=True)}


def normalized(lines):
    return [NUMBER.sub("<num>", line.rstrip()) for line in lines]


def test_readme_and_docs_have_examples():
    pages = {page for page, *_ in examples()}
    assert "README.md" in pages and len(pages) >= 5, pages


def test_every_example_says_what_it_prints_or_prints_nothing():
    for page, i, code, expected in examples():
        assert expected is not None or "print(" not in code, f"{page} example {i} prints but shows no output"


@pytest.mark.slow
@pytest.mark.parametrize(("page", "index"), [(p, i) for p, i, _, _ in examples()])
def test_example_prints_what_it_says(page, index):
    expected = next(e for p, i, _, e in examples() if (p, i) == (page, index))
    result = run_all()[(page, index)]
    if result.get("missing"):
        pytest.skip(f"{page} example {index} needs {result['missing']}, not installed")
    assert result["error"] is None, f"{page} example {index} failed:\n{result['error']}"
    printed = result["stdout"].strip().splitlines()
    assert normalized(printed) == normalized(expected or []), f"{page} example {index}"


def test_annotations_are_read():
    code = "print(x.shape)  # torch.Size([2, 3])\nprint(y)  # -> yes\nz = 1  # torch.Size([9])\n"
    notes = [ANNOTATION.search(line) for line in code.splitlines()]
    assert [n["text"] or n["size"] for n in notes if n] == ["torch.Size([2, 3])", "yes"]


PROGRESS_WORDING = re.compile(r"this stop|last stop|next stop|later issue|this session|last session", re.I)


def test_no_progress_report_wording():
    found = [f"{p.relative_to(ROOT)}: {m[0]!r}" for p in PAGES for m in PROGRESS_WORDING.finditer(p.read_text())]
    assert not found, found


def test_readme_is_one_screenful_per_topic():
    assert len(README.read_text().splitlines()) <= 250


LINK = re.compile(r"\]\((?!https?://|#)(?P<target>[^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_resolve():
    broken = [
        f"{p.relative_to(ROOT)} -> {m['target']}"
        for p in PAGES
        for m in LINK.finditer(p.read_text())
        if not (p.parent / m["target"]).exists()
    ]
    assert not broken, broken

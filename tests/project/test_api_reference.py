"""docs/api.md covers every public name, and each signature block in it is the code's: the argument
names, order, kinds and defaults of the function (or of a class's __init__ and methods), and every
argument is described in the entry."""

import ast
import importlib
import inspect
import pathlib
import re

import pytest
import torch

API = pathlib.Path(__file__).resolve().parents[2] / "docs" / "api.md"
# module -> the names it makes public (its __all__); integrations modules need their library
PUBLIC_MODULES = (
    "bmkernels",
    "bmkernels.nn",
    "bmkernels.flash_attn",
    "bmkernels.testing",
    "bmkernels.integrations.transformers",
    "bmkernels.integrations.timm",
)
BLOCK = re.compile(r"```python\n# api: (?P<name>[\w.]+)\n(?P<code>.*?)```", re.S)


def entries():
    """{qualified name: (code, the entry's text up to the next heading)}."""
    text = API.read_text()
    out = {}
    for m in BLOCK.finditer(text):
        start = text.rfind("\n### ", 0, m.start())
        end = text.find("\n##", m.end())
        out[m["name"]] = (m["code"], text[start : end if end > 0 else len(text)])
    return out


def public_names():
    names = []
    for module in PUBLIC_MODULES:
        try:
            mod = importlib.import_module(module)
        except ImportError:  # transformers / timm not installed
            continue
        names += [f"{module}.{n}" for n in mod.__all__]
    return names


def resolve(qualified):
    module, _, name = qualified.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        pytest.skip(f"{module} needs a library that is not installed")


def documented(fn: ast.FunctionDef):
    """[(name, kind, default source or None)] of a def in the docs."""
    a = fn.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + a.defaults
    out += [(p.arg, "POSITIONAL_OR_KEYWORD", d) for p, d in zip(positional, defaults, strict=True)]
    if a.vararg:
        out.append((a.vararg.arg, "VAR_POSITIONAL", None))
    out += [(p.arg, "KEYWORD_ONLY", d) for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]
    if a.kwarg:
        out.append((a.kwarg.arg, "VAR_KEYWORD", None))
    return out


def check_signature(doc_fn: ast.FunctionDef, real, what):
    params = list(inspect.signature(real).parameters.values())
    doc = documented(doc_fn)
    if doc and doc[0][0] == "self" and (not params or params[0].name != "self"):
        doc = doc[1:]  # inspect.signature(cls) leaves self out
    assert [(n, k) for n, k, _ in doc] == [(p.name, p.kind.name) for p in params], (
        f"{what}: docs/api.md says ({', '.join(n for n, _, _ in doc)}), the code has "
        f"({', '.join(p.name for p in params)})"
    )
    for (name, _, default), p in zip(doc, params, strict=True):
        has_default = p.default is not inspect.Parameter.empty
        assert (default is not None) == has_default, f"{what}: default of {name}"
        if default is not None and not (isinstance(default, ast.Constant) and default.value is Ellipsis):
            value = eval(ast.unparse(default), {"torch": torch})  # noqa: S307 -- our own docs
            assert value == p.default, f"{what}: {name}={p.default!r} in the code, {ast.unparse(default)} in the docs"
    return [n for n, _, _ in doc if n != "self"]


def test_every_public_name_has_an_entry():
    have = set(entries())
    text = API.read_text()
    missing = [n for n in public_names() if n not in have and f"### `{n}`" not in text]
    assert not missing, f"docs/api.md has no entry for {missing}"


@pytest.mark.parametrize("name", sorted(entries()))
def test_signature_block_matches_the_code(name):
    code, section = entries()[name]
    real = resolve(name)
    node = ast.parse(code).body[0]
    described = []
    if isinstance(node, ast.FunctionDef):
        described = check_signature(node, real, name)
    elif isinstance(node, ast.ClassDef):
        assert inspect.isclass(real), f"{name} is documented as a class"
        for fn in (n for n in node.body if isinstance(n, ast.FunctionDef)):
            target = real if fn.name == "__init__" else getattr(real, fn.name)
            names = check_signature(fn, target, f"{name}.{fn.name}")
            described += [] if fn.name == "__init__" else names  # constructors of drop-ins are torch's
    else:
        assert isinstance(node, ast.AnnAssign), f"{name}: a def, a class or `NAME: type`"
        kind = {"dict": dict, "tuple": tuple, "float": float}[ast.unparse(node.annotation).split("[")[0]]
        assert isinstance(real, kind), f"{name} is a {type(real).__name__}"
    undescribed = [
        n for n in described if f"`{n}`" not in section and n not in ("args", "kwargs", "backend")
    ]  # backend: the top of the page
    assert not undescribed, f"docs/api.md's entry for {name} does not describe {undescribed}"


def test_the_signatures_are_valid_python():
    for name, (code, _) in entries().items():
        ast.parse(code, filename=f"docs/api.md: {name}")


def test_readme_links_the_api_reference():
    assert "(docs/api.md)" in (API.parents[1] / "README.md").read_text()


def _untyped(fn):
    sig = inspect.signature(fn)
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty
    ]
    return missing + (["return"] if sig.return_annotation is inspect.Signature.empty else [])


def test_public_api_is_typed():
    untyped = {}
    for qualified in public_names():
        obj = resolve(qualified)
        if inspect.isfunction(obj):
            targets = {qualified: obj}
        elif inspect.isclass(obj):
            methods = {m: getattr(v, "__func__", v) for m, v in vars(obj).items() if m == "__init__" or m[0] != "_"}
            targets = {f"{qualified}.{m}": fn for m, fn in methods.items() if inspect.isfunction(fn)}
        else:
            continue  # constants and the nn module
        untyped |= {name: missing for name, fn in targets.items() if (missing := _untyped(fn))}
    assert not untyped, f"public functions without type hints: {untyped}"


def test_py_typed_is_shipped():
    root = API.parents[1]
    assert (root / "bmkernels" / "py.typed").is_file()
    assert 'package_data={"bmkernels": ["py.typed"]}' in (root / "setup.py").read_text()

"""The package's layering, read from the source with `ast`, and the deprecated import paths that still work.

What a loaded checkpoint runs (nn/, quantizers/, models/, hf/) and the config never import the calibration
engine, mixed precision, the transforms' application or the exporters; the exporters never import the calibration
engine; mixed precision and the transforms (their application included) never import the calibration engine or
the exporters, and mixed precision not the transforms' application either: what they share with the engine is in
`hf_qlimit.forward`, which imports nothing from hf_qlimit. Within the package only `hf_qlimit.quantize` (api.py)
imports the calibration engine. Checked twice: every import statement of those files (module level and inside
functions, relative ones resolved, `importlib.import_module("...")` with a literal name too), and what they load
when imported (the module-level imports, followed through the package, parent packages' `__init__` included)."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_qlimit"
ENGINE = ("hf_qlimit.calibration", "hf_qlimit.mixed_precision", "hf_qlimit.transforms.apply", "hf_qlimit.export")
RULES = {  # files (a folder: every module in it) -> the modules (and their submodules) they must not import
    "nn": ENGINE,
    "quantizers": ENGINE,
    "models": ENGINE,
    "hf": ENGINE,
    "config.py": ENGINE,
    "config_checks.py": ENGINE,
    "presets.py": ENGINE,
    "export": ("hf_qlimit.calibration",),
    "transforms": ("hf_qlimit.calibration", "hf_qlimit.mixed_precision", "hf_qlimit.export"),
    "mixed_precision": ("hf_qlimit.calibration", "hf_qlimit.transforms.apply", "hf_qlimit.export"),
    "forward.py": ("hf_qlimit",),  # the leaf that calibration, mixed precision and the transforms share
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: Path) -> str:
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _run_at_import(body: list[ast.stmt]):
    """The statements importing the module executes: not function bodies, not `if TYPE_CHECKING:` blocks."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            yield from _run_at_import(stmt.orelse)
            continue
        yield stmt
        for field in ("body", "orelse", "finalbody"):  # if / for / while / with / try / class blocks
            yield from _run_at_import(getattr(stmt, field, []))
        for handler in getattr(stmt, "handlers", []):
            yield from _run_at_import(handler.body)


@cache
def _imports(path: Path) -> tuple[tuple[int, str, bool, str], ...]:
    """(line, imported module, at module level, source text) of every import in `path`. `from a import b` gives
    both `a` and `a.b` (b may be a submodule); a relative import is resolved against the file's package."""
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    module_level = {id(stmt) for stmt in _run_at_import(tree.body)}
    found = []
    lines = source.splitlines()
    for node in ast.walk(tree):
        text = lines[node.lineno - 1].strip() if hasattr(node, "lineno") else ""
        top = id(node) in module_level
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, top, text) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path).split(".")
                base = ".".join(base[: len(base) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            found.append((node.lineno, module, top, text))
            found += [(node.lineno, f"{module}.{alias.name}", top, text) for alias in node.names if alias.name != "*"]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value, False, text))
    return tuple(found)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_under(module: str, prefixes: tuple[str, ...]) -> str | None:
    return next((p for p in prefixes if module == p or module.startswith(p + ".")), None)


def _checked_files(rule: str) -> list[Path]:
    target = PACKAGE / rule
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files, f"no files for the rule on {rule}: was it moved?"
    return files


def _where(path: Path, line: int, text: str) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{line}: {text.splitlines()[0]}"


@pytest.mark.parametrize("rule", list(RULES))
def test_no_import_statement_breaks_the_layering(rule):
    forbidden = RULES[rule]
    errors = {}  # one line per import statement
    for path in _checked_files(rule):
        for line, module, _, text in _imports(path):
            if _is_under(module, forbidden):
                errors.setdefault((str(path), line), f"{_where(path, line, text)}  (imports {module})")
    if errors:
        pytest.fail(
            f"hf_qlimit/{rule} must not import {', '.join(forbidden)}:\n" + "\n".join(errors.values()), pytrace=False
        )


def _loaded_by(name: str, modules: dict[str, Path], forbidden: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """The package modules importing `name` executes (module-level imports, followed; the parent packages'
    `__init__` up to, not including, hf_qlimit's own, which every import runs first), each with the chain that
    loads it: "file:line: import ..." steps. Forbidden modules are not followed: the first one reached is the
    one to report."""
    chains = {name: ()}
    todo = [name]
    while todo:
        current = todo.pop()
        if chains[current] and _is_under(current, forbidden):
            continue
        path = modules[current]
        steps = [(m, f"{current} is in package {m}") for m in _parents(current)]
        steps += [(m, _where(path, line, text)) for line, m, top, text in _imports(path) if top]
        for imported, step in steps:
            if imported in modules and imported != "hf_qlimit" and imported not in chains:
                chains[imported] = (*chains[current], step)
                todo.append(imported)
    return chains


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


@pytest.mark.parametrize("rule", list(RULES))
def test_importing_a_module_loads_nothing_it_may_not_import(rule):
    """The same rule on what importing the file loads: an allowed module that imports a forbidden one at module
    level breaks it too."""
    forbidden, modules = RULES[rule], _modules()
    errors = []
    for path in _checked_files(rule):
        for loaded, chain in _loaded_by(_module_name(path), modules, forbidden).items():
            if chain and _is_under(loaded, forbidden):  # chain (): the module itself
                errors.append(f"importing {_module_name(path)} loads {loaded}:\n    " + "\n    ".join(chain))
    if errors:
        pytest.fail(f"hf_qlimit/{rule} must not load {', '.join(forbidden)}:\n" + "\n".join(errors), pytrace=False)


def test_the_rules_see_relative_and_function_level_imports(tmp_path, monkeypatch):
    """The checker itself: a relative import two levels up, one inside a function and one via importlib."""
    package = tmp_path / "hf_qlimit"
    (package / "nn").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nn" / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\nfrom .. import calibration\n"
        "if TYPE_CHECKING:\n    from ..export import gguf\n"
    )
    (package / "nn" / "a.py").write_text(
        "import importlib\n\ndef f():\n    from ..transforms.apply import x\n"
        "    return importlib.import_module('hf_qlimit.export.gguf')\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    found = {(p.name, m, top) for p in sorted(package.rglob("*.py")) for _, m, top, _ in _imports(p)}
    assert ("__init__.py", "hf_qlimit.calibration", True) in found
    assert ("__init__.py", "hf_qlimit.export.gguf", False) in found  # for type checkers only: not loaded
    assert ("a.py", "hf_qlimit.transforms.apply", False) in found
    assert ("a.py", "hf_qlimit.export.gguf", False) in found
    with pytest.raises(pytest.fail.Exception, match=r"hf_qlimit/nn/a\.py:4: from \.\.transforms\.apply import x"):
        test_no_import_statement_breaks_the_layering("nn")


ENGINE_USER = "hf_qlimit.api"  # `hf_qlimit.quantize`: the one way into the calibration engine


def test_only_the_quantize_entry_point_imports_the_calibration_engine():
    """Outside calibration/, only api.py imports the engine (function level included): mixed precision and the
    transforms take what they share with it from hf_qlimit.forward."""
    engine = ("hf_qlimit.calibration",)
    errors = {}
    for name, path in _modules().items():
        if _is_under(name, engine) or name == ENGINE_USER:
            continue
        for line, module, _, text in _imports(path):
            if _is_under(module, engine):
                errors.setdefault((name, line), f"{_where(path, line, text)}  (imports {module})")
    if errors:
        pytest.fail(
            f"only {ENGINE_USER} may import hf_qlimit.calibration:\n" + "\n".join(errors.values()), pytrace=False
        )


def test_the_shared_helpers_rules_fail_on_a_tree_that_breaks_them(tmp_path, monkeypatch):
    """The rules on forward.py, mixed_precision, transforms and the engine's one entry point, on a tree where
    mixed precision and the transforms reach into the engine and forward.py imports the package."""
    package = tmp_path / "hf_qlimit"
    files = {
        "__init__.py": "",
        "api.py": "def quantize():\n    from .calibration.pipeline import quantize_model\n",
        "forward.py": "from .nn import modules\n",
        "nn/__init__.py": "",
        "calibration/__init__.py": "",
        "calibration/pipeline.py": "from ..forward import to_device\n",
        "calibration/fisher.py": "",
        "mixed_precision/__init__.py": "",
        "mixed_precision/sensitivity.py": "from ..calibration.fisher import output_logits\n",
        "transforms/__init__.py": "",
        "transforms/stats.py": "import torch\nfrom ..calibration.block_inputs import to_device\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    for rule, where in [
        ("forward.py", r"hf_qlimit/forward\.py:1: from \.nn import modules"),
        ("mixed_precision", r"hf_qlimit/mixed_precision/sensitivity\.py:1: from \.\.calibration\.fisher"),
        ("transforms", r"hf_qlimit/transforms/stats\.py:2: from \.\.calibration\.block_inputs"),
    ]:
        with pytest.raises(pytest.fail.Exception, match=where):
            test_no_import_statement_breaks_the_layering(rule)
    with pytest.raises(pytest.fail.Exception, match=r"loads hf_qlimit\.calibration"):
        test_importing_a_module_loads_nothing_it_may_not_import("mixed_precision")
    with pytest.raises(pytest.fail.Exception) as failed:
        test_only_the_quantize_entry_point_imports_the_calibration_engine()
    assert "sensitivity.py:1" in str(failed.value) and "stats.py:2" in str(failed.value)
    assert "api.py" not in str(failed.value) and "pipeline.py" not in str(failed.value)


# -- deprecated aliases, kept for one release --------------------------------------------------------------------


def test_quantization_arguments_from_the_top_level_still_works_and_warns():
    import hf_qlimit
    from hf_qlimit.cli import QuantizationArguments

    with pytest.warns(FutureWarning, match="hf_qlimit.cli import QuantizationArguments"):
        from hf_qlimit import QuantizationArguments as old
    assert old is QuantizationArguments
    with pytest.warns(FutureWarning):
        assert hf_qlimit.QuantizationArguments is QuantizationArguments
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        hf_qlimit.NoSuchName  # noqa: B018


def test_gguf_to_hf_imports_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from hf_qlimit.cli import gguf_to_hf
    assert callable(gguf_to_hf.main) and callable(gguf_to_hf.convert_gguf_to_hf)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["hf_qlimit.gguf", "hf_qlimit.cli.gguf_to_hf"])
def test_gguf_command_line_help(module):
    """`python -m hf_qlimit.gguf --help` still works, with a FutureWarning naming the new module; the new name
    gives the same help without one. Fresh interpreters: an import that already happened would not warn again."""
    run = subprocess.run(
        [sys.executable, "-W", "default", "-m", module, "--help"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Convert a GGUF checkpoint to a float32 transformers folder" in run.stdout
    warned = "FutureWarning" in run.stderr and "hf_qlimit.cli.gguf_to_hf" in run.stderr
    assert warned == (module == "hf_qlimit.gguf"), run.stderr[-3000:]


def test_old_gguf_module_still_exports_the_importer(monkeypatch):
    from hf_qlimit.cli import gguf_to_hf

    monkeypatch.delitem(sys.modules, "hf_qlimit.gguf", raising=False)  # so the import runs (and warns) again
    with pytest.warns(FutureWarning, match="hf_qlimit.gguf moved to hf_qlimit.cli.gguf_to_hf"):
        from hf_qlimit.gguf import convert_gguf_to_hf, main
    assert convert_gguf_to_hf is gguf_to_hf.convert_gguf_to_hf and main is gguf_to_hf.main

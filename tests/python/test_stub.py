"""python/torch_dp/_C.pyi describes the compiled module torch_dp._C: every public function and class of the module,
every public method, property and enum value of its classes, and every parameter of those (name, order, whether
it has a default) is in the stub, and the stub names nothing the module lacks.

The module's side is read by introspection: names from the module's and classes' dictionaries, parameters from the
signature pybind11 writes as the first line of each docstring. The stub's side is read with ast. Not compared:
private names (leading underscore; `__init__` is compared) and the test-only hooks, which the stub leaves out:
bindings.cpp hands each one to `torch_dp::detail::TestAccess` (src/test_access.h) under the hook's own name
(`TestAccess::copy_everything(...)` for `py::arg("copy_everything")`), so their names are read from there.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from torch_dp import _C

ROOT = Path(__file__).resolve().parents[2]
STUB = ROOT / "python" / "torch_dp" / "_C.pyi"
BINDINGS = ROOT / "python" / "csrc" / "bindings.cpp"

# A parameter: its name and whether it has a default.
Params = tuple[tuple[str, bool], ...]


def _test_only_hooks() -> set[str]:
    if not BINDINGS.is_file():
        pytest.fail(f"{BINDINGS} is missing: the test-only hooks are read from it (copy it beside the tests)")
    return set(re.findall(r"\bTestAccess::(\w+)\s*\(", BINDINGS.read_text()))


HOOKS = _test_only_hooks()


def _public(name: str) -> bool:
    return (not name.startswith("_") or name == "__init__") and name not in HOOKS


def _split_top_level(text: str) -> list[str]:
    """text split at the commas outside brackets (types such as dict[str, str], defaults such as <Issuing.a: 1>)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "([{<":
            depth += 1
        elif c in ")]}>" and depth:  # "->" never occurs inside the parameter list
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _module_params(obj: object, name: str) -> Params | None:
    """The parameters in pybind11's signature line `name(a: T, b: U = d) -> R`; None for an overloaded function,
    whose docstring lists one signature per overload (compared by name only)."""
    doc = obj.__doc__ or ""
    if "Overloaded function." in doc:
        return None
    first = doc.split("\n", 1)[0]
    assert first.startswith(f"{name}("), f"{name}: no pybind11 signature in its docstring: {first!r}"
    depth, end = 0, None
    for i, c in enumerate(first[len(name) :], start=len(name)):
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
            end = i
            break
    assert end is not None, f"{name}: unbalanced signature {first!r}"
    params = []
    for part in _split_top_level(first[len(name) + 1 : end]):
        if part in ("/", "*"):
            continue
        param = part.split(":", 1)[0].split("=", 1)[0].strip()
        if param != "self" and param not in HOOKS:
            params.append((param, "=" in part))
    return tuple(params)


def _stub_params(fn: ast.FunctionDef) -> Params:
    args = fn.args
    positional = [*args.posonlyargs, *args.args]
    defaults = [False] * (len(positional) - len(args.defaults)) + [True] * len(args.defaults)
    params = [(a.arg, d) for a, d in zip(positional, defaults)]
    params += [(a.arg, d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return tuple(p for p in params if p[0] != "self")


def _module_surface() -> dict[str, Params | None]:
    """Qualified name (`f`, `C`, `C.m`) -> parameters (None for classes, properties, enum values, overloads)."""
    surface: dict[str, Params | None] = {}
    for name, obj in vars(_C).items():
        if not _public(name) or name == "__init__":
            continue
        if isinstance(obj, type):
            surface[name] = None
            for member, value in vars(obj).items():
                if not _public(member):
                    continue
                if callable(value) and not isinstance(value, obj):  # a method (an enum value is an instance)
                    surface[f"{name}.{member}"] = _module_params(value, member)
                else:  # a property or an enum value
                    surface[f"{name}.{member}"] = None
        elif callable(obj):
            surface[name] = _module_params(obj, name)
    return surface


def _stub_surface() -> dict[str, Params | None]:
    surface: dict[str, Params | None] = {}
    tree = ast.parse(STUB.read_text(), filename=str(STUB))

    def is_property(fn: ast.FunctionDef) -> bool:
        return any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list)

    def is_overload(fn: ast.FunctionDef) -> bool:
        return any(
            (isinstance(d, ast.Name) and d.id == "overload") or (isinstance(d, ast.Attribute) and d.attr == "overload")
            for d in fn.decorator_list
        )

    def add_function(qualified: str, fn: ast.FunctionDef) -> None:
        surface[qualified] = None if is_property(fn) or is_overload(fn) else _stub_params(fn)

    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            add_function(node.name, node)
        elif isinstance(node, ast.ClassDef):
            surface[node.name] = None
            for member in node.body:
                if isinstance(member, ast.FunctionDef):
                    add_function(f"{node.name}.{member.name}", member)
                elif isinstance(member, ast.AnnAssign) and isinstance(member.target, ast.Name):
                    surface[f"{node.name}.{member.target.id}"] = None
    return surface


def test_every_public_name_of_the_module_is_in_the_stub():
    missing = sorted(set(_module_surface()) - set(_stub_surface()))
    assert not missing, f"torch_dp._C has {missing}, which python/torch_dp/_C.pyi does not describe"


def test_the_stub_names_only_what_the_module_has():
    extra = sorted(name for name in set(_stub_surface()) - set(_module_surface()))
    assert not extra, f"python/torch_dp/_C.pyi describes {extra}, which torch_dp._C does not have (or are test-only)"


def test_parameters_match():
    module, stub = _module_surface(), _stub_surface()
    differ = {
        name: {"module": module[name], "stub": stub[name]}
        for name in sorted(set(module) & set(stub))
        if module[name] is not None and stub[name] is not None and module[name] != stub[name]
    }
    assert not differ, f"parameters (name, has a default) differ between torch_dp._C and _C.pyi: {differ}"


def test_the_test_only_hooks_are_names_in_the_module():
    # Keeps the exclusion honest: each name read from bindings.cpp is a parameter or member of torch_dp._C, so the
    # pattern excludes hooks and nothing else.
    signatures = "\n".join(
        (getattr(value, "__doc__", None) or "").split("\n", 1)[0]
        for obj in vars(_C).values()
        for value in ([obj, *vars(obj).values()] if isinstance(obj, type) else [obj])
    )
    for hook in HOOKS:
        assert re.search(rf"\b{hook}\b", signatures), f"test-only hook {hook} is not in torch_dp._C"

"""Python source for what the emitted program needs besides the stage graphs: imports of torch and
standard-library objects, ``torch.nn`` modules rebuilt from their repr, and ``loss.py`` (the user's
loss function as source, and the rebuild of the model's output from the last stage's flat outputs).
See :mod:`autopart.codegen.emitter` for the rules.
"""

from __future__ import annotations

import ast
import builtins
import collections
import dis
import importlib
import inspect
import sys
import textwrap
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import TreeSpec

from autopart.errors import AutopartError

__all__ = [
    "EmitError",
    "global_names",
    "import_block",
    "import_line",
    "loss_file",
    "torch_module_expr",
]

_ALLOWED_ROOTS = frozenset({"torch", *sys.stdlib_module_names}) - {"autopart"}
_LOSS_NAMES = ("model_output", "pipeline_loss")


class EmitError(AutopartError):
    """The program cannot be written as standalone Python; the message says what to change."""


def torch_module_expr(module: nn.Module, what: str) -> str:
    """``torch.nn.Linear(in_features=16, out_features=32, bias=True)`` for a torch.nn leaf module
    whose repr is its constructor call (checked by rebuilding it)."""
    cls = type(module)
    hint = (
        "only torch.nn leaf modules whose repr is their constructor (Linear, Conv2d, LayerNorm, "
        "...) can be emitted from a torch.fx graph; make the model traceable by torch.export "
        "(autopart.trace(..., method='export')) so the graph holds plain tensor ops."
    )
    if getattr(nn, cls.__name__, None) is not cls or any(True for _ in module.children()):
        raise EmitError(f"{what} is a {cls.__module__}.{cls.__qualname__}: {hint}")
    expr = f"torch.nn.{module!r}"
    dtypes = {t.dtype for t in module.state_dict().values()}
    if len(dtypes) == 1 and next(iter(dtypes)) != torch.get_default_dtype():
        expr += f".to({next(iter(dtypes))})"
    try:
        rebuilt = eval(expr, {"torch": torch})  # a torch.nn constructor call built from repr
    except Exception as exc:
        raise EmitError(f"{what}: {expr} does not rebuild it ({exc}); {hint}") from exc

    def layout(m: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(n, tuple(t.shape), t.dtype) for n, t in m.state_dict().items()]

    if repr(rebuilt) != repr(module) or layout(rebuilt) != layout(module):
        raise EmitError(f"{what}: {expr} does not rebuild it exactly; {hint}")
    return expr


def import_block(lines: Sequence[str]) -> list[str]:
    """Import lines grouped as ruff's isort does: standard library, blank line, torch; then any
    assignments (``NoneType = type(None)``)."""
    split = dict.fromkeys(part for line in lines for part in line.split("\n"))
    imports = [line for line in split if line.startswith(("import ", "from "))]
    rest = [line for line in split if line not in imports]

    def key(line: str) -> tuple[bool, str]:
        return line.startswith("from "), line.split(" ")[1]

    stdlib = sorted(
        (line for line in imports if line.split(" ")[1].split(".")[0] != "torch"), key=key
    )
    torch_lines = sorted((line for line in imports if line not in stdlib), key=key)
    block = stdlib + ([""] if stdlib and torch_lines else []) + torch_lines
    return block + ([""] if rest else []) + rest


def import_line(name: str, obj: Any, what: str) -> str:
    """``import x as name`` / ``from m import q as name`` for a torch or standard-library object."""
    hint = (
        "the emitted program imports only torch and the standard library; use torch ops instead "
        "(or a module-level function that does)."
    )
    if isinstance(obj, types.ModuleType):
        module_name = obj.__name__
        if module_name.split(".")[0] not in _ALLOWED_ROOTS:
            raise EmitError(f"{what}, the module {module_name}: {hint}")
        return f"import {module_name}" + ("" if name == module_name else f" as {name}")
    module_name = getattr(obj, "__module__", None) or ""
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or ""
    if module_name.split(".")[0] not in _ALLOWED_ROOTS or not _resolves(module_name, qualname, obj):
        raise EmitError(f"{what} ({type(obj).__name__} from {module_name or 'nowhere'}): {hint}")
    if "." in qualname:
        head = qualname.split(".")[0]
        return f"from {module_name} import {head}\n{name} = {qualname}"
    return f"from {module_name} import {qualname}" + ("" if name == qualname else f" as {name}")


def _resolves(module_name: str, qualname: str, obj: Any) -> bool:
    try:
        value: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError):
        return False
    return value is obj


# -- loss ------------------------------------------------------------------------------------------


def loss_file(
    loss_fn: Callable[[Any, Any], torch.Tensor],
    spec: TreeSpec | None,
    constants: Mapping[int, Any] | None = None,
) -> str:
    """loss.py: the loss and how the model's output is rebuilt from the last stage's flat tensor
    outputs (``spec``; ``constants``: the flat leaves the trace fixed, by position)."""
    imports, definitions, call_name = _loss_definition(loss_fn)
    shim_imports, shims, expr = _rebuild(spec, constants or {})
    block = import_block(["from typing import Any", "import torch", *imports, *shim_imports])
    blocks = [
        '"""The training loss, written by autopart.emit.\n\n'
        "The last pipeline stage returns the model's outputs flattened into a tuple; "
        "``model_output``\nrebuilds the model's own output from them, and ``pipeline_loss`` "
        "(what run.py gives the schedule)\ncalls the loss on it for every micro-batch.\n"
        '"""\n\nfrom __future__ import annotations\n\n' + "\n".join(block),
        *definitions,
        *shims,
        "def model_output(flat: tuple[Any, ...]) -> Any:\n"
        '    """The model\'s output, rebuilt from the last stage\'s flat outputs."""\n'
        f"    return {expr}\n",
        "def pipeline_loss(output: Any, target: torch.Tensor) -> torch.Tensor:\n"
        '    """The loss of one micro-batch: the schedule passes the last stage\'s output."""\n'
        "    flat = tuple(output) if isinstance(output, (tuple, list)) else (output,)\n"
        f"    return {call_name}(model_output(flat), target)\n",
    ]
    text = "\n\n\n".join(b.strip("\n") for b in blocks) + "\n"
    _check_loss_module(text)
    return text


def _loss_definition(loss_fn: Callable[..., Any]) -> tuple[list[str], list[str], str]:
    """The import lines and top-level blocks that define the loss, and the name to call it by."""
    if isinstance(loss_fn, nn.Module):
        expr = torch_module_expr(loss_fn, "loss_fn")
        return [], [f"criterion = {expr}"], "criterion"
    module_name = getattr(loss_fn, "__module__", None) or ""
    qualname = getattr(loss_fn, "__qualname__", None) or ""
    if module_name.split(".")[0] == "torch" and _resolves(module_name, qualname, loss_fn):
        name = qualname.split(".")[-1]
        return [import_line(name, loss_fn, "loss_fn")], [], name
    if not inspect.isfunction(loss_fn):
        raise EmitError(
            f"loss_fn is a {type(loss_fn).__name__}; emit copies a loss as source, so pass a plain "
            "module-level function (or a torch function such as torch.nn.functional.mse_loss, or a "
            "torch.nn loss module such as torch.nn.CrossEntropyLoss())."
        )
    return _function_source(loss_fn)


def _function_source(fn: types.FunctionType) -> tuple[list[str], list[str], str]:
    name = fn.__name__
    ask = "define the loss with def at module level in a .py file, using only torch."
    if name == "<lambda>":
        raise EmitError(f"loss_fn is a lambda, whose source cannot be taken alone; {ask}")
    if name in _LOSS_NAMES:
        raise EmitError(f"loss_fn is named {name!r}, a name loss.py uses itself; rename it.")
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError) as exc:
        raise EmitError(
            f"cannot read the source of loss_fn {fn.__qualname__} ({exc}); {ask}"
        ) from exc
    if (
        len(tree.body) != 1
        or not isinstance(tree.body[0], ast.FunctionDef)
        or tree.body[0].name != name
        or tree.body[0].decorator_list
    ):
        raise EmitError(
            f"the source of loss_fn {fn.__qualname__} is not one undecorated def statement; {ask}"
        )
    consts: list[str] = []
    for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        value = cell.cell_contents
        if not _is_constant(value):
            raise EmitError(
                f"loss_fn {fn.__qualname__} is a closure over {var!r} (a {type(value).__name__}), "
                f"which has no source form; {ask}"
            )
        consts.append(f"{var} = {value!r}")
    imports: list[str] = []
    for global_name in global_names(fn.__code__):
        if global_name == "torch" or global_name in fn.__code__.co_freevars:
            continue
        if global_name in fn.__globals__:
            value = fn.__globals__[global_name]
            if _is_constant(value):
                consts.append(f"{global_name} = {value!r}")
            else:
                what = f"loss_fn {fn.__qualname__} uses {global_name}"
                imports.append(import_line(global_name, value, what))
        elif not hasattr(builtins, global_name):
            raise EmitError(
                f"loss_fn {fn.__qualname__} uses {global_name!r}, which is not defined; {ask}"
            )
    blocks = ["\n".join(consts)] if consts else []
    blocks.append(f"# copied from {fn.__module__}.{fn.__qualname__}\n{source}")
    return imports, blocks, name


def global_names(code: types.CodeType) -> Iterator[str]:
    """Names the function reads as globals, nested functions and comprehensions included."""
    seen: dict[str, None] = {}
    stack = [code]
    while stack:
        current = stack.pop(0)
        for instr in dis.get_instructions(current):
            if instr.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(instr.argval, str):
                seen.setdefault(instr.argval, None)
        stack += [c for c in current.co_consts if isinstance(c, types.CodeType)]
    yield from seen


def _is_constant(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_constant(v) for v in value)
    return value is None or type(value) in (bool, int, float, str)


def _literal(value: Any) -> str:
    """``value`` as Python source (a constant leaf of the model's output, e.g. ``None``)."""
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value or value is None
    except (ValueError, SyntaxError):
        same = False
    if not same:
        raise EmitError(
            f"the model's output holds the constant {text}, which the emitted loss cannot write "
            "as a literal; return tensors, None or numbers."
        )
    return text


def _rebuild(
    spec: TreeSpec | None, constants: Mapping[int, Any]
) -> tuple[list[str], list[str], str]:
    """Imports and class definitions the rebuild needs, and an expression of ``flat`` that rebuilds
    the structure ``spec`` describes, with the leaves in ``constants`` written as literals."""
    if spec is None:
        return [], [], "flat[0] if len(flat) == 1 else flat"
    shims: dict[str, str] = {}
    leaves = iter(range(spec.num_leaves))
    tensors = iter(range(spec.num_leaves))

    def build(node: TreeSpec) -> str:
        if node.is_leaf():
            i = next(leaves)
            return _literal(constants[i]) if i in constants else f"flat[{next(tensors)}]"
        children = [build(node.child(i)) for i in range(node.num_children)]
        kind = node.type
        if kind is tuple:
            return f"({children[0]},)" if len(children) == 1 else f"({', '.join(children)})"
        if kind is list:
            return f"[{', '.join(children)}]"
        if kind in (dict, collections.OrderedDict):
            items = ", ".join(f"{k!r}: {v}" for k, v in zip(node.context, children))
            return f"{{{items}}}"
        if kind is collections.namedtuple or (
            isinstance(node.context, type) and issubclass(node.context, tuple)
        ):
            cls = node.context
            shims.setdefault(
                cls.__name__,
                f"{cls.__name__} = collections.namedtuple({cls.__name__!r}, {list(cls._fields)!r})\n",
            )
            return f"{cls.__name__}({', '.join(children)})"
        if (
            isinstance(kind, type)
            and issubclass(kind, dict)
            and all(isinstance(k, str) for k in node.context)
        ):
            shims.setdefault(kind.__name__, _dict_shim(kind))
            items = ", ".join(f"{k}={v}" for k, v in zip(node.context, children))
            return f"{kind.__name__}({items})"
        raise EmitError(
            f"the model returns a {getattr(kind, '__qualname__', kind)}, which the emitted loss "
            "cannot rebuild without importing its library; return a tensor, or a tuple, list or "
            "dict of tensors."
        )

    expr = build(spec)
    defs = list(shims.values())
    imports = ["import collections"] if any("collections.namedtuple" in d for d in defs) else []
    return imports, defs, expr


def _dict_shim(kind: type) -> str:
    return (
        f"class {kind.__name__}(dict):\n"
        f'    """Stands in for {kind.__module__}.{kind.__qualname__},\n'
        '    so the program needs only torch: its fields by name, attribute or position."""\n\n'
        "    def __getattr__(self, name: str) -> Any:\n"
        "        try:\n"
        "            return self[name]\n"
        "        except KeyError:\n"
        "            raise AttributeError(name) from None\n\n"
        "    def __getitem__(self, key: Any) -> Any:\n"
        "        if isinstance(key, int):\n"
        "            return list(self.values())[key]\n"
        "        return super().__getitem__(key)\n"
    )


def _check_loss_module(text: str) -> None:
    """loss.py must run as its own module: compile it and execute its definitions."""
    try:
        exec(compile(text, "loss.py", "exec"), {"__name__": "loss"})
    except Exception as exc:
        raise EmitError(
            f"the emitted loss.py does not run on its own ({type(exc).__name__}: {exc}); define the "
            "loss with def at module level in a .py file, using only torch."
        ) from exc

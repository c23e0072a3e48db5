"""A call trace of a conversion, module by module: which rooms of `uptrain_gqa.conversion` it walks through, and how
often it goes back to one it had left.

`trace(fn)` runs `fn` under `sys.setprofile` and keeps the Python frames whose module is in
`uptrain_gqa.conversion` (frames of other code, torch's hooks included, are transparent: a conversion frame's
parent is the nearest conversion frame below it). From them:

- the call tree is folded: consecutive calls of the same function from the same frame that walk the same
  subtree are one (a loop over tensors, windows or layers counts once when every turn walks the same modules);
- the *walk* is the sequence of modules the folded tree's calls enter, in order: a call enters a module when the
  calling frame's module differs (a module calling its own functions stays where it is);
- **modules entered** is the number of distinct modules in the walk;
- a **return to a module already left** is an entry into a module that was entered before and has no frame left on
  the stack (it had returned): A calls B, B returns, and later the walk comes back into B. Returning to a caller
  still running is not one (that module never left).

`layer_walks(tree)` cuts the folded walk at each `LayeredSource.load_layer` call: one walk per decoder layer of the
calibration pass, from its weights loaded until the next layer's are, so a pass can be judged layer by layer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PACKAGE = "uptrain_gqa.conversion."


@dataclass
class Call:
    """One call of a conversion function, and the conversion calls it made (folded)."""

    module: str
    function: str
    children: list[Call] = field(default_factory=list)
    direct: bool = True
    """Called by its parent's frame itself (False: through other code, e.g. torch running a hook)."""

    def key(self) -> tuple:
        return (self.module, self.function, self.direct, tuple(c.key() for c in self.children))

    def add(self, child: Call) -> None:
        """Append `child`, folding it into the previous sibling when it repeats it exactly."""
        if self.children and self.children[-1].key() == child.key():
            return
        self.children.append(child)


def trace(fn: Callable[[], Any]) -> Call:
    """The folded call tree of conversion frames while `fn` runs (root: a pseudo-call outside the package)."""
    root = Call("", "<outside>")
    stack: list[tuple[Any, Call]] = [(None, root)]

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event not in ("call", "return"):
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(PACKAGE):
            return
        if event == "call":
            direct = frame.f_back is not None and frame.f_back is stack[-1][0]
            stack.append((frame, Call(module.removeprefix(PACKAGE), frame.f_code.co_qualname, direct=direct)))
        elif len(stack) > 1 and stack[-1][0] is frame:
            _, done = stack.pop()
            stack[-1][1].add(done)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    while len(stack) > 1:  # frames an exception unwound
        _, done = stack.pop()
        stack[-1][1].add(done)
    return root


@dataclass
class Walk:
    """The modules a (part of a) trace enters, in order, and the entries into modules already left."""

    entered: list[str] = field(default_factory=list)
    returns: list[str] = field(default_factory=list)

    @property
    def modules(self) -> int:
        return len(set(self.entered))


DATA = frozenset({"options", "steps", "methods", "merge_method", "checks", "spill"})
"""Rooms of data and I/O every stage reads (the options, the plan's dataclasses, the method registry, the reader's
checks, the disk spill): their frames are transparent in `walk(..., stages_only=True)`."""


def walk(root: Call, stages_only: bool = False) -> Walk:
    """The walk of the whole folded tree (see the module docstring); `stages_only`: frames of `DATA` rooms are
    transparent (what they call is called by their caller)."""
    out = Walk()
    _walk(_stages(root) if stages_only else root, [], set(), out)
    return out


def _stages(call: Call) -> Call:
    children: list[Call] = []
    for child in call.children:
        child = _stages(child)
        children += child.children if child.module in DATA else [child]
    out = Call(call.module, call.function, direct=call.direct)
    for child in children:
        out.add(child)
    return out


def calls(root: Call, function: str) -> int:
    """How many (folded) calls of `function` (a qualified name) the tree holds."""
    return sum((c.function == function) + calls(c, function) for c in root.children)


def upward_calls(root: Call, imports: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(caller, callee) module pairs where a conversion frame calls straight into a module that imports its own
    (directly or not): a call back up the layers. `imports`: each room's conversion imports, transitively."""
    found: set[tuple[str, str]] = set()

    def visit(call: Call) -> None:
        for child in call.children:
            up = call.module in imports.get(child.module, set())
            if call.module and child.direct and child.module != call.module and up:
                found.add((call.module, child.module))
            visit(child)

    visit(root)
    return found


def _walk(call: Call, on_stack: list[str], seen: set[str], out: Walk) -> None:
    for child in call.children:
        if child.module != call.module:  # a call into another module: an entry
            if child.module in seen and child.module not in on_stack:
                out.returns.append(child.module)
            seen.add(child.module)
            out.entered.append(child.module)
        _walk(child, [*on_stack, child.module], seen, out)


def layer_walks(root: Call) -> list[Walk]:
    """One walk per decoder layer of the pass: from a `LayeredSource.load_layer` call to the next one (or to the
    end of the frame that made them), modules left before the layer began not counted as left."""
    walks: list[Walk] = []

    def visit(call: Call, path: list[Call]) -> bool:
        loads = [i for i, c in enumerate(call.children) if c.function == "LayeredSource.load_layer"]
        if not loads:
            return any(visit(c, [*path, c]) for c in call.children)
        stack = [c.module for c in path]
        for j, start in enumerate(loads):
            end = loads[j + 1] if j + 1 < len(loads) else len(call.children)
            part = Call(call.module, call.function, call.children[start:end])
            one = Walk()
            _walk(part, stack, set(), one)
            walks.append(one)
        return True

    visit(root, [root])
    return walks


def conversion_imports(package_dir: Any) -> dict[str, set[str]]:
    """Each conversion room's imports of other conversion rooms, transitively (read from the source files)."""
    import ast
    from pathlib import Path

    direct: dict[str, set[str]] = {}
    for path in Path(package_dir).glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
                found.add(node.module.removeprefix(PACKAGE))
        direct[path.stem] = found
    closed: dict[str, set[str]] = {}
    for room in direct:
        todo, seen = list(direct[room]), set()
        while todo:
            r = todo.pop()
            if r not in seen:
                seen.add(r)
                todo += direct.get(r, set())
        closed[room] = seen
    return closed

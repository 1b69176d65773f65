"""Static checks of the library's layout (issue: one fused-op subpackage, one-way imports).

- no import cycle among the modules of `tf_proxynorm` (imports inside functions count);
- no module uses another module's private names (`mod._name`, `from mod import _name`);
  private *modules* of a package (`_graph`, `layers._base`) are fine;
- every `TF_PROXYNORM_*` environment variable is named (parsed) in one module only;
- only `tf_proxynorm.fused` (and the `python -m` entry points) refers to the compiled library;
- private attributes and modules of Keras and TensorFlow are used in the adapter modules
  only (`_backend`, `_graph`; `fused` for TensorFlow's, since it imports nothing else of the
  package).
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tf_proxynorm"
# Sources that setup.py copies into a built package; never part of the checkout's package.
IGNORED = {"custom_ops"}


def _module_name(path):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
           if not IGNORED & set(p.relative_to(PACKAGE).parts)}
PACKAGES = {name for name, p in MODULES.items() if p.name == "__init__.py"}


def _resolve(module, node):
    """The absolute base module of an ImportFrom in `module`."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if module in PACKAGES else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module):
    """[(imported module, {local alias: module} for modules bound to names, [names])]."""
    tree = ast.parse(MODULES[module].read_text())
    edges, aliases, private_imports = set(), {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    edges.add(alias.name)
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            if not base.startswith("tf_proxynorm"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in MODULES:
                    edges.add(full)
                    aliases[alias.asname or alias.name] = full
                else:
                    edges.add(base)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private_imports.append(f"from {base} import {alias.name}")
    return tree, edges, aliases, private_imports


GRAPH = {m: _imports(m) for m in MODULES}


def test_the_module_list_is_complete():
    assert "tf_proxynorm.fused.build" in MODULES and "tf_proxynorm.ops.proxy" in MODULES
    assert len(MODULES) > 40


def test_no_import_cycles():
    edges = {m: sorted(GRAPH[m][1] - {m}) for m in MODULES}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in edges[m]:
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_can_fail():
    """The checker sees imports inside functions and relative imports (a planted cycle)."""
    a = ast.parse("def f():\n    from tf_proxynorm.fused import build\n")
    node = next(n for n in ast.walk(a) if isinstance(n, ast.ImportFrom))
    assert _resolve("tf_proxynorm.fused.loader", node) == "tf_proxynorm.fused"
    rel = ast.parse("from . import settings").body[0]
    assert _resolve("tf_proxynorm.fused.build", rel) == "tf_proxynorm.fused"
    assert "tf_proxynorm.fused.build" in GRAPH["tf_proxynorm.fused.loader"][1]


def test_no_module_uses_another_modules_private_names():
    offences = []
    for module, (tree, _, aliases, private_imports) in GRAPH.items():
        offences += [f"{module}: {line}" for line in private_imports]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and f"{aliases[node.value.id]}.{node.attr}"
                    not in MODULES):
                offences.append(f"{module}: {node.value.id}.{node.attr}")
    assert offences == []


def test_each_setting_is_parsed_in_one_module():
    where = {}
    for module, (tree, _, _, _) in GRAPH.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(
                    r"TF_PROXYNORM_[A-Z_]+", node.value):
                where.setdefault(node.value, set()).add(module)
    assert {"TF_PROXYNORM_BUILD_CUDA", "TF_PROXYNORM_CACHE_DIR", "TF_PROXYNORM_NO_BUILD",
            "TF_PROXYNORM_SOURCE_DIR", "TF_PROXYNORM_CUDA_ARCHS",
            "TF_PROXYNORM_IMPLEMENTATION"} <= set(where)
    assert {k: sorted(v) for k, v in where.items() if len(v) > 1} == {}
    assert where["TF_PROXYNORM_BUILD_CUDA"] == {"tf_proxynorm.fused.settings"}


@pytest.mark.parametrize("needle", ["load_op_library", "custom_ops"])
def test_only_the_fused_subpackage_knows_the_compiled_library(needle):
    users = sorted(m for m, p in MODULES.items() if needle in p.read_text()
                   and not m.startswith("tf_proxynorm.fused"))
    assert users == []


def test_fused_subpackage_depends_on_nothing_else_of_the_package_but_config_and_version():
    """The subpackage sits at the bottom: the rest of the package imports it, not the reverse."""
    outside = {n for m in MODULES if m.startswith("tf_proxynorm.fused")
               for n in GRAPH[m][1] if not n.startswith("tf_proxynorm.fused")}
    assert outside <= {"tf_proxynorm.config", "tf_proxynorm.version"}, outside


# Private APIs of Keras and TensorFlow (from a grep of the package), and the modules allowed
# to use each: a framework upgrade that changes one of them breaks those modules only.
# `tf_proxynorm._backend` and `tf_proxynorm._graph` list in their docstrings which they use and
# why. The fused op's wrapper (`fused/ops.py`, `fused/loader.py`) reads TensorFlow internals
# behind fallbacks; `fused` imports nothing of the package but config and version, so it
# cannot go through `_backend`.
ADAPTERS = {"tf_proxynorm._backend", "tf_proxynorm._graph"}
FRAMEWORK_PRIVATE = {
    "_flatten_layers": ADAPTERS,             # Layer: every nested layer
    "_functional": ADAPTERS,                 # Sequential: its functional model
    "_nodes_by_depth": ADAPTERS,             # Functional: the graph's nodes
    "_keras_history": ADAPTERS,              # KerasTensor: the op that made it
    "_inputs_struct": ADAPTERS,              # Functional: nesting of inputs / outputs
    "_outputs_struct": ADAPTERS,
    "_kernel": ADAPTERS,                     # Conv / Dense: the kernel variable
    "_device_functions_outer_to_inner": {"tf_proxynorm.fused"},   # tf.Graph device scopes
    "keras.src": ADAPTERS,                   # modules
    "tensorflow.python": {"tf_proxynorm.fused"},
}


def _framework_private_uses(tree):
    """The `FRAMEWORK_PRIVATE` names `tree` uses: attributes (`x._kernel`, `getattr(x,
    "_kernel")`) and imports (`import keras.src.x`, `from tensorflow.python import y`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        for name in names:
            found.update(key for key in FRAMEWORK_PRIVATE
                         if name == key or ("." in key and name.startswith(key + ".")))
    return found


def test_framework_internals_are_used_in_the_adapter_modules_only():
    offences = []
    for module, (tree, _, _, _) in GRAPH.items():
        for name in sorted(_framework_private_uses(tree)):
            allowed = FRAMEWORK_PRIVATE[name]
            if not any(module == m or module.startswith(m + ".") for m in allowed):
                offences.append(f"{module}: {name} (allowed in {sorted(allowed)})")
    assert offences == []


def test_the_framework_internals_check_can_fail():
    """The checker sees attribute reads, getattr strings and imports (planted uses)."""
    planted = ast.parse(
        "import keras.src.ops\n"
        "from tensorflow.python.framework import ops\n"
        "def f(model, conv):\n"
        "    return model._flatten_layers(), getattr(model, '_nodes_by_depth'), conv._kernel\n")
    assert _framework_private_uses(planted) == {
        "keras.src", "tensorflow.python", "_flatten_layers", "_nodes_by_depth", "_kernel"}
    assert _framework_private_uses(ast.parse("import tensorflow\nx = '_kernel size'")) == set()

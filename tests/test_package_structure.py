"""Static checks of the library's layout (issue: one fused-op subpackage, one-way imports).

- no import cycle among the modules of `tf_proxynorm` (imports inside functions count);
- no module uses another module's private names (`mod._name`, `from mod import _name`);
  private *modules* of a package (`_graph`, `layers._base`) are fine;
- every `TF_PROXYNORM_*` environment variable is named (parsed) in one module only;
- only `tf_proxynorm.fused` (and the `python -m` entry points) refers to the compiled library;
- one definition per public name: no public top-level name is defined in two modules, no
  top-level function is a copy of another, and the group-count rule is written once.
- loading a cached library imports the read-only `fused.cache`, never the compiler driver
  `fused.build` (imported inside the function that builds).
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


# -- one definition per name -------------------------------------------------------------------

# `main` of each `python -m` entry point (`fused.build`, `fused.info`) is one name by convention.
ENTRY_POINT = "main"


def _public_definitions(tree):
    """Public names a module defines at top level (functions, classes, assignments); names
    it imports are not definitions."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return {n for n in names if not n.startswith("_")}


def _duplicate_names(trees):
    """{name: modules} for the public names defined in more than one of `trees`."""
    where = {}
    for module, tree in trees.items():
        for name in _public_definitions(tree):
            where.setdefault(name, set()).add(module)
    return {n: ms for n, ms in where.items() if len(ms) > 1 and n != ENTRY_POINT}


def _function_copies(trees):
    """Groups of top-level functions (public or private) of different modules with the same
    arguments and code, docstrings aside: a pass-through copy or a private re-definition."""
    by_code = {}
    for module, tree in trees.items():
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef):
                continue
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            code = ast.dump(node.args) + "".join(ast.dump(b) for b in body)
            by_code.setdefault(code, set()).add(f"{module}.{node.name}")
    return [names for names in by_code.values() if len({n.rsplit(".", 1)[0] for n in names}) > 1]


def _divisor_searches(trees):
    """Where a comprehension over `range(...)` keeps the `d` with `n % d == 0` (the
    group-count rule: the largest divisor of the channels at most `groups`)."""
    found = []
    for module, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.comprehension) and isinstance(node.iter, ast.Call)
                    and getattr(node.iter.func, "id", None) == "range"):
                continue
            for cond in node.ifs:
                if (isinstance(cond, ast.Compare) and isinstance(cond.left, ast.BinOp)
                        and isinstance(cond.left.op, ast.Mod)
                        and isinstance(cond.ops[0], ast.Eq)
                        and getattr(cond.comparators[0], "value", None) == 0):
                    found.append(module)
    return found


TREES = {m: GRAPH[m][0] for m in MODULES}


def test_each_public_name_is_defined_in_one_module():
    """A newcomer who greps a public name lands on one definition (no three `group_norm_act`s
    or two `canonical_name`s)."""
    assert {n: sorted(ms) for n, ms in _duplicate_names(TREES).items()} == {}


def test_no_function_is_a_copy_of_another():
    """E.g. a private `_stats_dtype` beside `stats.stats_dtype`: import the one definition."""
    assert _function_copies(TREES) == []


def test_the_group_count_rule_is_written_once():
    """`ops.stats.largest_divisor_at_most` is the rule for EvoNorm-S0, the model builders and
    `convert_model` (it was written twice, under two names)."""
    assert _divisor_searches(TREES) == ["tf_proxynorm.ops.stats"]


def test_the_one_definition_checks_can_fail():
    """Planted modules: the three `group_norm_act`s, a private copy of `stats_dtype`, and the
    group-count rule in two places, as they were before issue 24."""
    planted = {
        "a.group_norm": ast.parse(
            "def group_norm_act(x):\n    return x\n"
            "def _stats_dtype(d):\n    return 'float64' if d == 'float64' else 'float32'\n"),
        "a.norm_act": ast.parse("from a.fused import group_norm_act as g\n"
                                "def group_norm_act(x, implementation='auto'):\n"
                                "    return g(x)\n"),
        "a.fused": ast.parse("OP_NAME = 'x'\ndef group_norm_act(x):\n    return -x\n"),
        "a.abi": ast.parse("OP_NAME = 'x'\n"),
        "a.stats": ast.parse(
            "def stats_dtype(d):\n    \"\"\"Doc.\"\"\"\n"
            "    return 'float64' if d == 'float64' else 'float32'\n"
            "def largest(c, g):\n    return max(d for d in range(1, g + 1) if c % d == 0)\n"),
        "a.evonorm": ast.parse(
            "def evonorm_groups(c, g=32):\n"
            "    return next(d for d in range(g, 0, -1) if c % d == 0)\n"
            "def main():\n    return 0\n"),
        "a.info": ast.parse("def main():\n    return 1\n"),
    }
    assert _duplicate_names(planted) == {
        "group_norm_act": {"a.group_norm", "a.norm_act", "a.fused"},
        "OP_NAME": {"a.fused", "a.abi"}}
    assert _function_copies(planted) == [{"a.group_norm._stats_dtype", "a.stats.stats_dtype"}]
    assert sorted(_divisor_searches(planted)) == ["a.evonorm", "a.stats"]
def _imported_at_import_time(start):
    """The modules of the package that importing `start` imports: its imports outside
    function bodies (those inside run only when called), the packages above each, and
    theirs in turn."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        nodes = list(ast.iter_child_nodes(GRAPH[module][0]))
        while nodes:
            node = nodes.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            nodes += ast.iter_child_nodes(node)
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name in MODULES]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node)
                if base.startswith("tf_proxynorm"):
                    todo += [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                             for a in node.names]
    return seen


def test_loading_a_cached_library_never_imports_the_compiler_driver():
    """`import tf_proxynorm`, the loader and `info` import the read-only `fused.cache`; the
    compiler driver `fused.build` only when a build runs (tests/test_build.py checks it in
    a process: a warm cache, or TF_PROXYNORM_NO_BUILD=1, never imports it)."""
    driver = "tf_proxynorm.fused.build"
    assert driver in _imported_at_import_time("tf_proxynorm.build")   # the check can fail
    for start in ("tf_proxynorm", "tf_proxynorm.fused.loader", "tf_proxynorm.fused.info",
                  "tf_proxynorm.info"):
        reached = _imported_at_import_time(start)
        assert "tf_proxynorm.fused.cache" in reached, start
        assert driver not in reached, start
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

"""The package's import graph, read from the source: no cycles, no private names across modules.

Every `import` and `from ... import` in `keffconvert/` counts, those inside functions too (a
deferred import is still a dependency). Importing `a.b.c` also runs the packages `a.b` and `a`,
so it depends on them as well, except on its own packages (they are already running when it
runs); the top package `keffconvert` is left out, since its `__init__` loads names only when
they are first used.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "keffconvert"
TOP = "keffconvert"


def module_names(root=ROOT):
    """{dotted module name: path} of every module and package under `root`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name, path, modules):
    """(modules `name` depends on, private names it imports from other modules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets, private = set(), []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.split(".")[0] == TOP)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != TOP:
                continue
            for alias in node.names:
                child = f"{source}.{alias.name}"
                if child in modules:
                    targets.add(child)
                else:
                    targets.add(source)
                    if alias.name.startswith("_"):
                        private.append(f"{name} imports {alias.name} from {source}")
            continue
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}
    depends = set(targets)
    for target in targets:  # the packages it runs too, but for its own (already running when it runs)
        parts = target.split(".")
        depends.update(".".join(parts[:i]) for i in range(2, len(parts)))
    depends -= ancestors - targets
    depends &= set(modules)
    depends.discard(name)
    private += [f"{name} imports the private module {t}" for t in depends if t.rpartition(".")[2].startswith("_")
                and not t.endswith("__init__")]
    return depends, private


def import_graph():
    modules = module_names()
    graph, private = {}, []
    for name, path in modules.items():
        graph[name], found = imports_of(name, path, modules)
        private += found
    return graph, private


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def floors(graph):
    """The length of the longest chain of imports (a module importing nothing of ours is floor 1)."""
    depth = {}

    def floor(node):
        if node not in depth:
            depth[node] = 1 + max((floor(n) for n in graph[node]), default=0)
        return depth[node]

    return max(floor(n) for n in graph)


def test_the_package_has_no_import_cycle():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_another_modules_private_names():
    _, private = import_graph()
    assert private == []


def test_the_import_graph_stays_shallow():
    # 16 floors before the packages by pipeline stage; a new floor is a question worth asking
    graph, _ = import_graph()
    assert floors(graph) <= 13, floors(graph)


def test_the_checks_find_what_they_look_for(tmp_path):
    """The parser sees a cycle through a deferred import, a package's __init__ and a private name."""
    package = tmp_path / TOP
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from keffconvert.sub.b import thing\n")
    (package / "sub" / "a.py").write_text("def f():\n    from keffconvert.sub import b\n")
    (package / "sub" / "b.py").write_text("from keffconvert.c import _hidden\nthing = 1\n")
    (package / "c.py").write_text("import keffconvert.sub.a\n_hidden = 2\n")
    modules = module_names(package)
    graph, private = {}, []
    for name, path in modules.items():
        graph[name], found = imports_of(name, path, modules)
        private += found
    assert find_cycle(graph) is not None
    assert private == ["keffconvert.sub.b imports _hidden from keffconvert.c"]

"""The package's shape: layers import only downward, no import cycle (function-local imports
count), no module over 650 lines, and the public face the README uses."""
import ast
from pathlib import Path

import pytest

import deqir_dist

PKG = Path(deqir_dist.__file__).resolve().parent

# lowest first; a module may import its own layer or any layer below it
LAYERS = ("errors", "sampling", "physics", "io", "data", "quality", "parallel", "models", "solvers", "api",
          "dataset", "ray", "serve", "apps")
MAX_LINES = 650


def _modules():
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), p


def _imports(name: str, path: Path) -> set[str]:
    """deqir_dist modules imported anywhere in the file (relative to the package)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "deqir_dist" or (node.module or "").startswith("deqir_dist."):
                mod = node.module[len("deqir_dist."):] if node.module != "deqir_dist" else ""
            else:
                continue
            # "from pkg import module" imports the module
            for a in node.names:
                sub = f"{mod}.{a.name}" if mod else a.name
                out.add(sub if (PKG / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PKG / sub.replace(".", "/") / "__init__.py").exists() else mod)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("deqir_dist."):
                    out.add(a.name[len("deqir_dist."):])
    return out


GRAPH = {name: _imports(name, path) for name, path in _modules()}


def _layer(mod: str) -> int:
    top = mod.split(".")[0]
    return LAYERS.index("apps" if top == "__main__" else top)


def test_every_module_has_a_layer():
    for mod in GRAPH:
        if mod:
            assert mod == "__main__" or mod.split(".")[0] in LAYERS, f"{mod} is in no layer of {LAYERS}"


def test_layers_import_only_downward():
    bad = [f"{m} -> {d}" for m, deps in GRAPH.items() if m for d in deps
           if d and _layer(d) > _layer(m)]
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = {m: {d for d in deps if d and d != m} for m, deps in GRAPH.items() if m}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_module_size():
    big = [f"{p.relative_to(PKG)}: {n}" for _, p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, f"modules over {MAX_LINES} lines: {big}"


PUBLIC = ("restore", "restore_file", "noise_gradient", "optimize_noise", "make_operator", "load_denoiser", "DeqirError",
          "RestoreResult", "NoiseGradient", "NoiseOptimization", "OPERATOR_NAMES", "read_image", "write_image",
          "psnr", "ssim")


@pytest.mark.parametrize("name", PUBLIC)
def test_public_face(name):
    assert name in deqir_dist.__all__
    assert getattr(deqir_dist, name) is not None

"""The package's layers point one way (docs/DESIGN.md): no module of elf_jax imports a module
of a higher layer, at the top of the file or inside a function. Read from the source (ast),
nothing imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "elf_jax"

#: From the ground up; a name is a top-level module or package of elf_jax.
LAYERS = (
    ("foundation", {"__init__", "version", "keys", "hashing", "xla_cpu", "workdir", "metrics",
                    "loops", "augment", "losses", "checkpoint", "models", "parallel", "data",
                    "synset"}),
    ("engine", {"train"}),
    ("method", {"teacher", "elf", "distill", "interop"}),
    ("application", {"config", "report", "pipeline", "cli"}),
)


def _layer(module: str) -> int:
    """The layer of `elf_jax[.top[...]]`."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, (_, names) in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py; place it in one")


def _imports(path: Path):
    """`(line, module)` of every elf_jax module `path` imports, anywhere in the file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "elf_jax":  # `from elf_jax import report`
                names = [f"elf_jax.{a.name}" for a in node.names]
        else:
            continue
        yield from ((node.lineno, n) for n in names if n == "elf_jax" or n.startswith("elf_jax."))


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def test_no_module_imports_a_higher_layer():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the package was found
    upward = []
    for path in files:
        mine = _layer(_module(path))
        for line, name in _imports(path):
            if _layer(name) > mine:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} "
                              f"({LAYERS[mine][0]} -> {LAYERS[_layer(name)][0]})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The reader finds a function-local import of a higher layer (the check can fail)."""
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from elf_jax.pipeline import Run\n"
                   "    import elf_jax.train.step\n")
    found = list(_imports(src))
    assert found == [(2, "elf_jax.pipeline"), (3, "elf_jax.train.step")]
    assert _layer("elf_jax.pipeline") > _layer("elf_jax.train.step") > _layer("elf_jax.losses")

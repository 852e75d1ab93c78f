"""The README's arrows hold: kernels <- trainer <- cluster; data_pipeline imports neither Ray nor the
loop. Every import statement is read with ast, function-level (lazy) ones included, so an import
added anywhere in a package that points the wrong way fails here, naming the file and line."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# package -> module prefixes it must never import
FORBIDDEN = {
    "kernels": ("trainer", "cluster", "data_pipeline", "ray"),
    "trainer": ("cluster", "ray"),
    "data_pipeline": ("ray", "cluster", "trainer.loop"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]  # from trainer import loop
    return found


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return bad


def test_imports_flow_one_way():
    bad = [v for package, forbidden in FORBIDDEN.items() for v in violations(package, forbidden)]
    assert not bad, "imports against the arrows (kernels <- trainer <- cluster; data_pipeline imports " \
                    "neither Ray nor the loop):\n" + "\n".join(bad)


def test_the_check_sees_lazy_imports(tmp_path):
    """The checker itself: a function-level import and a `from package import module` are seen."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from cluster.ray_train import run_training\n\nfrom trainer import loop\n")
    assert {"cluster.ray_train", "trainer.loop"} <= {m for _, m in imported_modules(f)}


def test_one_entry_point_registers_every_command_group():
    """setup.cfg's console script is cluster.cli:main, and its parser has every group's commands."""
    from cluster.cli import build_parser
    assert "crossflow = cluster.cli:main" in (REPO / "setup.cfg").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"train", "sample", "interpolate", "arithmetic", "export", "config", "plan", "eval", "sweep", "data",
            "submit", "jobs"} <= set(sub.choices)

"""The package's layout by stage (docs/architecture.md): each stage imports only the stages below it,
no module imports another in a circle, and the inference stage runs without the training stack."""
import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "segguided_jax"

# Bottom to top. The package's root holds the commands (thin: flags and a call into their stage) and
# two modules every stage may use: runtime (XLA's CPU settings, the random-bits algorithm) and
# config_schema (the config's keys and their checks), which import nothing of the package.
STAGES = ("", "io", "data", "models", "parallel", "evaluation", "inference", "training", "experiments|compilation",
          "commands")
FOUNDATIONS = {"segguided_jax", "segguided_jax.runtime", "segguided_jax.config_schema"}
COMMANDS = {"train", "predict", "evaluate", "export", "compile_check"}


def _modules() -> dict:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _rank(module: str) -> int:
    if module in FOUNDATIONS:
        return 0
    name = module.split(".")[1]
    stage = [i for i, s in enumerate(STAGES[1:-1], 1) if name in s.split("|")]
    if stage:
        return stage[0]
    assert name in COMMANDS, f"{module}: the package's root holds only the stages, the commands and the foundations"
    return len(STAGES) - 1


def _imports(path: pathlib.Path, modules: dict) -> set:
    """The package's modules that the file imports anywhere (at the top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("segguided_jax"):
                while name not in modules and "." in name:
                    name = name.rsplit(".", 1)[0]
                found.add(name)
    return found


def test_each_stage_imports_only_the_stages_below_it_and_nothing_imports_in_a_circle():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m, "segguided_jax"} for m, p in modules.items()}
    up = [f"{m} ({STAGES[_rank(m)] or 'foundation'}) imports {d} ({STAGES[_rank(d)] or 'foundation'})"
          for m, deps in graph.items() for d in sorted(deps) if _rank(d) > _rank(m)]
    assert not up, "arrows back up:\n" + "\n".join(up)
    # Within a stage: a depth-first search for a circle.
    state, circles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                circles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_commands_are_thin():
    """A command module is its docstring, its imports and the call into its stage."""
    for name in COMMANDS:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert len(ast.unparse(ast.Module(body=body, type_ignores=[])).splitlines()) <= 80, name
        if name != "train":  # the training command holds its flags, the config's check and the lease
            assert len(body) <= 3, name


def test_the_inference_stage_imports_no_training_stack():
    """Every module of the inference stage (predict and export included) imports without flax,
    optax, orbax or grain: a checkpoint's reader imports them when it reads one."""
    modules = sorted(m for m in _modules() if m.startswith("segguided_jax.inference"))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'flax', 'optax', 'orbax', 'grain'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "[]", out.stdout

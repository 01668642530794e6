"""The package keeps its shape: imports flow one way between hybrid's packages, cost_model imports nothing from
hybrid, the environment gives only a cache folder and a tokenizer path, and no class or function grows past the
size a reader can hold."""
import ast
import re

from conftest import ROOT

ORDER = ["model", "kernels", "planning", "offload", "engine", "server"]     # a package imports only those before it
ALLOWED = {"model": set(), "kernels": {"model"}, "planning": {"model"}, "offload": {"model", "kernels", "planning"},
           "engine": {"model", "kernels", "planning", "offload"},
           "server": {"model", "kernels", "planning", "offload", "engine"}}


def sources(folder):
    return sorted((ROOT / folder).rglob("*.py"))


def imported_packages(path):
    """hybrid packages a module imports, absolute or relative."""
    tree, here = ast.parse(path.read_text()), path.parent.name
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found.add(here)
            elif node.level == 2 and node.module:
                found.add(node.module.split(".")[0])
            elif node.module and node.module.startswith("hybrid."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("hybrid.")}
    return found - {here}


def test_imports_flow_one_way_between_packages():
    for pkg in ORDER:
        for path in sources(f"hybrid/{pkg}"):
            wrong = imported_packages(path) - ALLOWED[pkg]
            assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"


def test_cost_model_imports_nothing_from_hybrid_nor_torch():
    for path in sources("cost_model"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) (hybrid|torch)\b", text, re.M), path


def test_the_environment_gives_only_a_cache_folder_and_a_tokenizer_path():
    names = set()
    for folder in ("hybrid", "cost_model", "eval"):
        for path in sources(folder):
            if "probes" in path.parts:
                continue
            names |= set(re.findall(r"environ(?:\.get)?\(\s*[\"'](\w+)", path.read_text()))
            names |= set(re.findall(r"environ\[[\"'](\w+)", path.read_text()))
    for path in (ROOT / "run.py", ROOT / "calibrate.py"):
        names |= set(re.findall(r"environ(?:\.get)?\(\s*[\"'](\w+)", path.read_text()))
    assert names <= {"HYBRID_CACHE", "HYBRID_TOKENIZER"}, names


def test_no_class_over_200_lines_and_no_function_over_60():
    for path in sources("hybrid"):
        for node in ast.walk(ast.parse(path.read_text())):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef):
                assert size <= 200, f"{path.name}: class {node.name} has {size} lines"
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert size <= 60, f"{path.name}: {node.name} has {size} lines"

"""trees/ is the ground floor: it imports nothing else of ours, so every package may import it."""

import ast
from pathlib import Path

import trees

OUR_PACKAGES = {"export", "runtime", "train", "tests"}


def test_trees_imports_nothing_else_of_ours():
    wrong = []
    for path in sorted(Path(trees.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            wrong += [f"{path.name}: {name}" for name in names if name.split(".")[0] in OUR_PACKAGES]
    assert not wrong, f"trees/ must import nothing of ours: {wrong}"

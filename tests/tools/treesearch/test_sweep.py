"""tools/treesearch/sweep.py pieces not covered end to end by tests/trees/test_cli.py (the sweep command)."""

from tools.treesearch.sweep import format_sweep


def row(variant: str, budget: int, predicted: float | None) -> dict:
    return {"variant": variant, "budget": budget, "tokens_per_s": 30.0, "speedup": 1.0, "mean_accepted": 1.2,
            "predicted_mean_accepted": predicted, "predicted_speedup": None if predicted is None else 1.1,
            "matches_vanilla": 2}


def test_columns_line_up_for_long_tree_file_names():
    rows = [row("vanilla", 1, None), row("chosen (ht-tree-nvidia-h100-80gb-hbm3-onnxruntime.json)", 12, 1.4)]
    lines = format_sweep(rows, 2).splitlines()
    assert len(lines) == 3
    # the budget column ends at the same character on every line, the header's "T" included
    ends = {line.index(f"{value:>4}", len(label)) + 4
            for line, label, value in zip(lines, ["variant", *(r["variant"] for r in rows)], ["T", "1", "12"])}
    assert len(ends) == 1, lines
    assert all(line.endswith("2/2") for line in lines[1:])

"""python -m train ht-layers: the layer comparison table and PNG from training reports."""

import json

import pytest

from train.__main__ import main
from train.layer_report import load_runs, markdown_table


def write_report(path, layer, top1, **overrides):
    report = {"layer": layer, "num_layers": 30, "num_maps": 2, "model_fingerprint": "abc", "train_samples": 300,
              "val_samples": 128, "val_positions": 5000, "val_top1": top1, "val_top10": [0.6, 0.4],
              "val_loss": 9.0, "trainable_parameters": 10, "train_seconds": 12.0,
              "config": {"lr": "0.01", "seed": "0"}, **overrides}
    path.write_text(json.dumps(report))
    return path


def test_table_and_png_sorted_by_layer(tmp_path, capsys):
    a = write_report(tmp_path / "a.json", 22, [0.2, 0.1])
    b = write_report(tmp_path / "b.json", 8, [0.3, 0.15])
    runs = load_runs([a, b])
    assert [r.layer for r in runs] == [8, 22]
    table = markdown_table(runs)
    assert "| 8 | 0.300 / 0.150 |" in table and table.index("| 8 |") < table.index("| 22 |")
    assert main(["ht-layers", str(a), str(b), "--out", str(tmp_path / "layers.png")]) == 0
    assert (tmp_path / "layers.png").stat().st_size > 10_000
    assert not [p for p in tmp_path.iterdir() if ".png." in p.name]  # no temp file left behind


def test_runs_that_differ_in_more_than_the_layer_are_refused(tmp_path, capsys):
    a = write_report(tmp_path / "a.json", 8, [0.3, 0.15])
    b = write_report(tmp_path / "b.json", 22, [0.2, 0.1], train_samples=100)
    with pytest.raises(ValueError, match="train_samples=100.*differ only in --layer"):
        load_runs([a, b])
    c = write_report(tmp_path / "c.json", 22, [0.2, 0.1], config={"lr": "0.001", "seed": "0"})
    assert main(["ht-layers", str(a), str(c), "--out", str(tmp_path / "x.png")]) == 2
    assert "lr='0.001'" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="at least two"):
        load_runs([a])

"""The demo explains the bundled sentiment classifier and prints a heatmap."""

from __future__ import annotations

from mambalrp import demo


def test_demo_prints_predictions_heatmaps_and_conservation(capsys):
    text = demo.run(color=False)
    assert text in capsys.readouterr().out
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert blocks[1].startswith("positive")  # "a gorgeous , witty , seductive movie ."
    assert blocks[2].startswith("negative") and blocks[3].startswith("negative")
    assert " witty[+" in blocks[1] and " poorly[+" in blocks[2]
    for block in blocks[1:]:
        line = [ln for ln in block.splitlines() if ln.startswith("conservation:")][0]
        numbers = [float(tok) for tok in line.replace("=", " ").replace("+ biases", " ").split() if tok[0] in "+-"]
        assert abs(numbers[0] - numbers[1] - numbers[2]) < 1e-3

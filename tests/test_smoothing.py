

# ---- the report -----------------------------------------------------------------------------------------------------

def test_certified_accuracy_counts_robust_rows_at_or_above_each_radius(tmp_path):
    from PIL import Image as PILImage

    from utils.certify.report_smoothing import (certified_accuracy_at, certified_accuracy_figure,
                                                certified_accuracy_table)
    from utils.files import save_figure
    rows = [{"verdict": "robust", "radius": "0.5"}, {"verdict": "robust", "radius": 0.2},
            {"verdict": "misclassified", "radius": "0.9"}, {"verdict": "abstain", "radius": ""}]
    assert certified_accuracy_at([0, 0.2, 0.3, 0.5, 0.6], rows) == [0.5, 0.5, 0.25, 0.25, 0.0]
    table = certified_accuracy_table([0, 0.5], {"a": rows})
    assert "| a | 50% (2/4) | 25% (1/4) |" in table
    figure = certified_accuracy_figure({"a": rows, "b": rows[:1]}, marks=[0.5], cap=0.8)
    path = save_figure(figure, tmp_path / "figure.png")
    assert PILImage.open(path).size[0] > 300
    with pytest.raises(ValueError):
        certified_accuracy_at([0], [])

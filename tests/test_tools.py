"""The programs of tools/ not tested beside what they serve: the label map's writer and the model exporter."""
import pytest
import torch

from tests.conftest import REPO, make_tiny_model, run_tool


@pytest.mark.smoke
def test_the_label_map_is_written_byte_identical_to_the_committed_one(tmp_path):
    result = run_tool("tools.create_idx_to_label", "--output", tmp_path / "labels.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Wrote 1000 labels to ")
    assert (tmp_path / "labels.json").read_bytes() == (REPO / "assets" / "imagenet_idx_to_label.json").read_bytes()


def test_export_model_writes_a_program_that_gives_the_models_logits_and_classes(tmp_path, tiny_images, monkeypatch,
                                                                               capsys):
    """tools.export_model in process on the tiny model (its normalization outside its network, as a torchvision
    classifier's is): the .pt2 read back gives the same logits and predictions, with the class list beside it."""
    from tools import export_model
    from utils.cli import UsageError
    from utils.models import classes_path, load_model, predict
    model = make_tiny_model()
    asked = []
    monkeypatch.setattr(export_model, "load_model",
                        lambda name, device, **options: asked.append((name, device, options)) or model)
    output = tmp_path / "tiny.pt2"
    export_model.main(export_model.get_args_parser().parse_args(["--model", "tiny", "--output", str(output)]))
    assert asked == [("tiny", "cpu", {"classes": None, "input_size": None})]
    assert capsys.readouterr().out == f"Wrote {output} (1000 classes, 32 x 32 RGB in [0, 1]) and {classes_path(output)}\n"
    loaded = load_model(str(output))
    assert loaded.classes == model.classes and loaded.preprocessing.crop_size == 32
    torch.testing.assert_close(loaded(tiny_images), model(tiny_images), rtol=1e-5, atol=1e-5)
    assert torch.equal(predict(loaded, tiny_images).argmax(dim=1), predict(model, tiny_images).argmax(dim=1))
    with pytest.raises(UsageError, match="must end in .pt2"):
        export_model.main(export_model.get_args_parser().parse_args(["--output", str(tmp_path / "tiny.pt")]))
    assert not (tmp_path / "tiny.pt").exists()

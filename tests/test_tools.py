"""The programs of tools/ not tested beside what they serve: the label map's writer."""
import pytest

from tests.conftest import REPO, run_tool


@pytest.mark.smoke
def test_the_label_map_is_written_byte_identical_to_the_committed_one(tmp_path):
    result = run_tool("tools.create_idx_to_label", "--output", tmp_path / "labels.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Wrote 1000 labels to ")
    assert (tmp_path / "labels.json").read_bytes() == (REPO / "assets" / "imagenet_idx_to_label.json").read_bytes()

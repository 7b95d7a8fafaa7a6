"""ExportOptions: checked when made, and export_model takes them whole or as keywords."""
import pytest

from mercury_onnx.export.convert import ExportError
from mercury_onnx.export.pipeline import ExportOptions, export_model


def test_options_are_checked_when_made():
    with pytest.raises(ExportError, match="unknown token dtype \\['int4'\\]"):
        ExportOptions(token_dtypes=["int8", "int4"])
    assert ExportOptions(dynamo=True).opset == 18          # the dynamo exporter's lowest opset
    assert ExportOptions(dynamo=True, opset=19).opset == 19
    assert ExportOptions().opset == 17


def test_export_model_refuses_bad_options_before_building_anything(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an export folder"):
        export_model("no_such_model_xyz", tmp_path / "taken", [0.5], ExportOptions(log=None))
    with pytest.raises(ExportError, match="unknown token dtype"):        # keywords override options
        export_model("no_such_model_xyz", tmp_path / "new", [0.5], ExportOptions(), token_dtypes=["fp8"])
    with pytest.raises(TypeError, match="no_such_option"):
        export_model("no_such_model_xyz", tmp_path / "new", [0.5], no_such_option=1)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine" and not (tmp_path / "new").exists()

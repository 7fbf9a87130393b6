"""`bnlab fold FILE` loads safely: no code from a pickle runs without --trust-file."""

import re

import torch
from torch import nn
from typer.testing import CliRunner

from bnlab import nn as bnn
from bnlab.cli import app
from inference_models import SmallResNet


class WritesAMarker:
    """Unpickling this object runs ``exec`` (what a malicious model file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran code from the file')",))


def _fold(path, *extra):
    return CliRunner().invoke(app, ["fold", str(path), "-o", str(path.parent / "out.pt"), "--input-shape", "2,3,8,8", *extra])  # fmt: skip


def test_a_crafted_pickle_runs_no_code_without_the_flag(tmp_path):
    marker = tmp_path / "marker.txt"
    torch.save(WritesAMarker(marker), tmp_path / "evil.pt")
    result = _fold(tmp_path / "evil.pt")
    assert result.exit_code == 2, result.output
    assert not marker.exists(), "unpickling ran code from the file"
    text = " ".join(result.output.split())
    # torch 2.6 names the global "builtins.exec", torch 2.13 "exec"
    assert "refused to unpickle" in text and "--trust-file" in text
    assert re.search(r"it needs (builtins\.)?exec,", text), text
    result = _fold(tmp_path / "evil.pt", "--trust-file")  # the flag does what it says
    assert marker.exists() and result.exit_code == 2


def test_models_of_torch_and_bnlab_classes_load_without_the_flag(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)).eval()  # fmt: skip
    torch.save(model, tmp_path / "model.pt")
    result = _fold(tmp_path / "model.pt")
    assert result.exit_code == 0, result.output
    assert "folded 2 BatchNorm layer(s)" in result.output


def test_a_user_class_needs_the_flag(tmp_path):
    torch.save(SmallResNet().eval(), tmp_path / "resnet.pt")
    result = _fold(tmp_path / "resnet.pt")
    assert result.exit_code == 2
    assert "inference_models.SmallResNet" in " ".join(result.output.split())
    assert _fold(tmp_path / "resnet.pt", "--trust-file").exit_code == 0

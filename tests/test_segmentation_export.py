"""kdgraph.segmentation.export: plain torchvision, in a process without kdgraph, loads the export
and computes what the student computes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kdgraph.errors import KDGraphError
from kdgraph.models import create_model
from kdgraph.segmentation.export import CONSTRUCTOR, WEIGHTS, export_torchvision, torchvision_state_dict
from kdgraph.segmentation.losses import resize_to

LOADER = """
import json, sys
import torch, torchvision
from safetensors.torch import load_file
folder = sys.argv[1]
ctor = json.load(open(folder + "/constructor.json"))
model = torchvision.models.get_model(ctor["name"], weights=None, **ctor["kwargs"]).eval()
model.load_state_dict(load_file(folder + "/model.safetensors"))  # strict: every key, no other
x = torch.load(folder + "/x.pt")
with torch.no_grad():
    out = model(x)
torch.save({k: v for k, v in out.items()}, folder + "/out.pt")
assert not any(m.startswith("kdgraph") for m in sys.modules), "kdgraph was imported"
"""


@pytest.mark.parametrize("name,kwargs", [("lraspp_mobilenet_v3_large", {"num_classes": 4}),
                                         ("fcn_resnet50", {"num_classes": 3, "aux_loss": True})])
def test_plain_torchvision_loads_the_export_and_computes_the_same(tmp_path, name, kwargs):
    torch.manual_seed(0)
    student = create_model(f"torchvision:{name}", kwargs)
    with torch.no_grad():  # trained-looking BN statistics, so eval mode differs from a fresh model
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    student.eval()
    folder = export_torchvision(student, tmp_path / "export")
    record = json.loads((folder / CONSTRUCTOR).read_text())
    assert record["name"] == name and record["kwargs"] == {**kwargs, "weights_backbone": None}
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, folder / "x.pt")
    run = subprocess.run([sys.executable, "-c", LOADER, str(folder)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = torch.load(folder / "out.pt")
    with torch.no_grad():
        heads = student(x)
    heads = heads if isinstance(heads, tuple) else (heads,)  # (out, aux) with aux_loss: true
    assert ("aux" in out) == kwargs.get("aux_loss", False) == (len(heads) == 2)
    # another process may sum in another order (its own thread count): equal up to float32 rounding
    # of a ResNet's depth, relative to the logits' scale
    for name, head in zip(("out", "aux"), heads):
        mine = resize_to(head, (64, 64))
        torch.testing.assert_close(out[name], mine, rtol=1e-4, atol=1e-5 * float(mine.abs().max()))


def test_export_refuses_foreign_files_adapters_and_meta_weights(tmp_path):
    student = create_model("torchvision:lraspp_mobilenet_v3_large", {"num_classes": 2})
    (tmp_path / WEIGHTS).write_bytes(b"someone else's")
    with pytest.raises(KDGraphError, match="kdgraph did not write it"):
        export_torchvision(student, tmp_path)
    assert (tmp_path / WEIGHTS).read_bytes() == b"someone else's"
    mine = export_torchvision(student, tmp_path / "mine")
    export_torchvision(student, mine)  # its own export may be written again
    with pytest.raises(KDGraphError, match="outside its torchvision model .e.g. 'lift.weight'"):
        torchvision_state_dict({"net.a": torch.zeros(1), "lift.weight": torch.zeros(1)})
    with pytest.raises(KDGraphError, match="meta device"):
        export_torchvision(create_model("torchvision:lraspp_mobilenet_v3_large", {"num_classes": 2}, meta=True),
                           tmp_path / "meta")
    with pytest.raises(KDGraphError, match="needs a SegmentationModel"):
        export_torchvision(torch.nn.Linear(1, 1), tmp_path / "linear")


def test_an_export_killed_between_its_weights_and_its_constructor_is_written_over_by_the_rerun(tmp_path):
    from safetensors.torch import load_file

    from kdgraph.runtime.ship import INCOMPLETE
    from kdgraph.segmentation.export import CONSTRUCTOR

    student = create_model("torchvision:lraspp_mobilenet_v3_large", {"num_classes": 2})
    folder = tmp_path / "killed"
    folder.mkdir()
    (folder / INCOMPLETE).write_text("kdgraph export was writing this folder; run it again\n")
    (folder / WEIGHTS).write_bytes(b"half of the weights")  # killed here: no constructor.json yet
    export_torchvision(student, folder)
    assert sorted(p.name for p in folder.iterdir()) == [CONSTRUCTOR, WEIGHTS]
    written = load_file(str(folder / WEIGHTS))
    assert all(torch.equal(written[k], v) for k, v in torchvision_state_dict(student.state_dict()).items())
    assert json.loads((folder / CONSTRUCTOR).read_text())["written_by"] == "kdgraph"
    (folder / INCOMPLETE).unlink(missing_ok=True)
    (folder / CONSTRUCTOR).unlink()  # weights alone, no marker: not shown to be kdgraph's, refused
    with pytest.raises(KDGraphError, match="kdgraph did not write it"):
        export_torchvision(student, folder)

"""Model sources and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kdgraph.errors import ModelError
from kdgraph.models import MODEL_SOURCES, build_model, create_model, load_checkpoint, register_model_source
from kdgraph.spec import ModelSpec, load_spec

SPECS = Path(__file__).resolve().parent.parent / "specs"


def test_timm_builds_the_named_class():
    import timm.models.resnet

    model = create_model("timm:resnet18", {"num_classes": 7})
    assert type(model) is timm.models.resnet.ResNet
    assert model.fc.out_features == 7


def test_torchvision_builds_the_named_class():
    import torchvision

    model = create_model("torchvision:resnet18", {"num_classes": 5})
    assert type(model) is torchvision.models.ResNet
    assert model.fc.out_features == 5


def test_module_source_from_spec_directory():
    model = create_model("module:custom_models:tiny_convnet", {"num_classes": 4, "width": 8}, search_path=SPECS)
    assert type(model).__name__ == "TinyConvNet"
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    assert str(SPECS) not in __import__("sys").path  # the search path is only added while building


def test_tiny_convnet_is_fx_traceable():
    model = create_model("module:custom_models:tiny_convnet", {}, search_path=SPECS)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 1, 16, 16)
    model.eval()
    traced.eval()
    torch.testing.assert_close(traced(x), model(x))


def test_module_source_errors_name_what_failed():
    with pytest.raises(ModelError, match="cannot import module 'no_such_pkg'"):
        create_model("module:no_such_pkg:f")
    with pytest.raises(ModelError, match="has no attribute 'tiny_convnt'.*tiny_convnet"):
        create_model("module:custom_models:tiny_convnt", search_path=SPECS)
    with pytest.raises(ModelError, match="not callable"):
        create_model("module:math:pi")
    with pytest.raises(ModelError, match="returned OrderedDict, not a torch.nn.Module"):
        create_model("module:collections:OrderedDict")


def test_unknown_timm_name_suggests_close_name():
    with pytest.raises(ModelError) as info:
        create_model("timm:resnet181")
    assert "unknown timm model 'resnet181'" in str(info.value)
    assert "resnet18" in str(info.value).split("did you mean")[1]


def test_unknown_torchvision_name_suggests_close_name():
    with pytest.raises(ModelError, match="did you mean.*resnet50"):
        create_model("torchvision:resnet05")


def test_unknown_source_lists_sources():
    with pytest.raises(ModelError, match="timm, torchvision, module"):
        create_model("hub:resnet18")


def test_wrong_kwarg_is_a_model_error():
    with pytest.raises(ModelError, match="custom_models:tiny_convnet"):
        create_model("module:custom_models:tiny_convnet", {"depth": 3}, search_path=SPECS)


def test_registered_source_builds_and_validates_in_spec():
    register_model_source("toy", lambda name, kwargs: nn.Linear(int(name), 2, **kwargs))
    try:
        assert create_model("toy:3").in_features == 3
        spec = load_spec({"name": "t", "student": {"model": "toy:3"}})
        assert build_model(spec.student).in_features == 3
    finally:
        MODEL_SOURCES.unregister("toy")


def _tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("module:custom_models:tiny_convnet", {"width": 4}, search_path=SPECS)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    source, target = _tiny(0), _tiny(1)
    assert not torch.equal(source.fc.weight, target.fc.weight)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    load_checkpoint(target, path)
    _assert_same_state(source, target)


def test_torch_round_trip(tmp_path):
    source, target = _tiny(0), _tiny(1)
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    load_checkpoint(target, path)
    _assert_same_state(source, target)


def test_training_checkpoint_model_key(tmp_path):
    source, target = _tiny(0), _tiny(1)
    path = tmp_path / "last.pt"
    torch.save({"model": source.state_dict(), "epoch": 3, "optimizer": {"state": {}}}, path)
    load_checkpoint(target, path)
    _assert_same_state(source, target)


def test_build_model_loads_checkpoint(tmp_path):
    source = _tiny(0)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    spec = ModelSpec(model="module:custom_models:tiny_convnet", kwargs={"width": 4}, checkpoint=path)
    _assert_same_state(source, build_model(spec, search_path=SPECS))


def test_mismatched_checkpoint_names_keys(tmp_path):
    state = _tiny(0).state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ModelError) as info:
        load_checkpoint(_tiny(1), path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys (1): fc.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "fc.weight: checkpoint (3, 3) vs model (10, 16)" in message


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ModelError, match="checkpoint not found: .*nope.safetensors"):
        load_checkpoint(_tiny(0), tmp_path / "nope.safetensors")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _tiny(0)}, path)  # a whole module needs unpickling arbitrary classes
    with pytest.raises(ModelError, match="cannot read checkpoint .*refusing to load"):
        load_checkpoint(_tiny(1), path)

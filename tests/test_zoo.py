import pytest
import torch
import torch.fx

from kdgraph import zoo

FACTORIES = [zoo.resnet_tiny, zoo.resnet_tiny_teacher, zoo.resnet_tiny_student, zoo.resnet_tiny_student_same]


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("hw,stage_hw", [(8, (8, 4, 2)), (28, (28, 14, 7))])
def test_shapes(factory, hw, stage_hw):
    torch.manual_seed(0)
    model = factory(num_classes=7, in_chans=1).eval()
    x = torch.randn(2, 1, hw, hw)
    assert model(x).shape == (2, 7)
    feats = []
    hooks = [getattr(model, f"layer{i}").register_forward_hook(lambda m, i, o: feats.append(o)) for i in (1, 2, 3)]
    model(x)
    for h in hooks:
        h.remove()
    assert [f.shape[-1] for f in feats] == list(stage_hw)
    assert [f.shape[1] for f in feats] == [info["num_chs"] for info in model.feature_info]


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_fx_trace_matches_forward(factory):
    torch.manual_seed(0)
    model = factory(in_chans=3).eval()
    x = torch.randn(3, 3, 8, 8)
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), model(x))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"layer1.0.conv1", "layer3.0.downsample.0", "global_pool", "fc"} <= targets


def test_param_counts_ordered():
    t, s, ss = zoo.resnet_tiny_teacher(), zoo.resnet_tiny_student(), zoo.resnet_tiny_student_same()
    assert _n_params(t) > _n_params(ss) > _n_params(s)


def test_downsample_only_where_shape_changes():
    m = zoo.resnet_tiny_teacher()
    assert isinstance(m.layer1[0].downsample, torch.nn.Identity)  # stem width == layer1 width, stride 1
    assert isinstance(m.layer2[0].downsample, torch.nn.Sequential)
    assert isinstance(m.layer2[1].downsample, torch.nn.Identity)

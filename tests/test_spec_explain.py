"""kdgraph.spec.explain: a validation error rendered as one SpecError naming the dotted YAML path,
what was given and what is allowed; a table of broken specs, each with the path and the words
the message must hold (written out here), every problem one line, long values cut short."""

from __future__ import annotations


import pytest

from kdgraph.errors import SpecError
from kdgraph.spec import load_spec
from kdgraph.spec.explain import MAX_SHOWN, short

from test_spec_loader import MINIMAL, write  # the minimal spec, a spec file written here
from test_spec_schema import KD  # a teacher-student spec


# (id, YAML text, overrides, expected SpecError.path, fragments that must be in the message)
BROKEN = [
    ("unknown-key", KD + "scheduel: {epochs: 3}\n", [], "scheduel", ["did you mean 'schedule'", "allowed: name, seed"]),
    ("unknown-nested-key", KD + "data: {batch_sise: 3}\n", [], "data.batch_sise", ["did you mean 'batch_size'"]),
    ("wrong-literal", KD + "schedule: {method: stableKD}\n", [], "schedule.method", ["stablekd, kd, kd+mse, supervised", "'stableKD'"]),
    ("wrong-augment", KD + "data: {augment: flip}\n", [], "data.augment", ["auto, none, crop, crop+flip"]),
    ("negative-batch", KD + "data: {batch_size: -4}\n", [], "data.batch_size", ["greater than or equal to 1", "got -4", "an integer from 1 to 65536"]),
    ("fraction-zero", KD + "data: {fraction: 0}\n", [], "data.fraction", ["greater than 0"]),
    ("fraction-above-one", KD + "data: {fraction: 1.5}\n", [], "data.fraction", ["less than or equal to 1"]),
    ("bad-model-prefix", "name: t\nstudent: {model: 'hub:resnet18'}\n", [], "student.model",
     ["unknown model source 'hub'", "timm:NAME, torchvision:NAME, module:pkg.mod:factory"]),
    ("model-without-source", "name: t\nstudent: {model: resnet18}\n", [], "student.model", ["SOURCE:NAME", "timm:NAME"]),
    ("bad-module-ref", "name: t\nstudent: {model: 'module:mymodels'}\n", [], "student.model", ["module:pkg.mod:factory"]),
    ("pretrained-kwarg", "name: t\nstudent: {model: 'timm:resnet18', kwargs: {pretrained: true}}\n", [],
     "student.kwargs", ["pretrained: true", "checkpoint: PATH"]),
    ("pretrained-and-checkpoint", "name: t\nstudent: {model: 'timm:resnet18', pretrained: true, checkpoint: w.pt}\n",
     [], "student.pretrained", ["either pretrained: true or a checkpoint"]),
    ("pretrained-module", "name: t\nstudent: {model: 'module:pkg.mod:f', pretrained: true}\n", [],
     "student.pretrained", ["module: models have no pretrained weights", "checkpoint: PATH"]),
    ("too-many-recompositions", KD + "decompose: {blocks: 4}\nschedule: {recompositions: 3}\n", [],
     "schedule.recompositions", ["at most 2 recompositions"]),
    ("stage-epochs-sum", KD + "schedule: {epochs: 10, stage_epochs: [3, 3, 3]}\n", [], "schedule.stage_epochs",
     ["sum to 9", "epochs=10"]),
    ("stage-epochs-length", KD + "schedule: {epochs: 10, stage_epochs: [5, 5]}\n", [], "schedule.stage_epochs",
     ["3 training stage(s)", "2 stage_epochs given"]),
    ("stage-epochs-zero", KD + "schedule: {epochs: 10, stage_epochs: [0, 5, 5]}\n", [], "schedule.stage_epochs.0",
     ["greater than or equal to 1", "an integer from 1 to 100000"]),
    ("kd-without-teacher", MINIMAL + "schedule: {method: kd}\n", [], "teacher",
     ["method 'kd' needs a teacher", "schedule.method: supervised"]),
    ("supervised-with-teacher", KD + "schedule: {method: supervised}\n", [], "schedule.method",
     ["supervised trains without a teacher"]),
    ("cuts-wrong-length", KD + "decompose: {blocks: 3, cuts: [{teacher: layer3, student: layer3}]}\n", [],
     "decompose.cuts", ["3 blocks need 2 cuts, 1 given"]),
    ("cuts-missing-student", KD + "decompose: {blocks: 2, cuts: [{teacher: layer3}]}\n", [],
     "decompose.cuts.0.student", ["required key is missing"]),
    ("cuts-bad-word", KD + "decompose: {cuts: manual}\n", [], "decompose.cuts", ["'manual'", "auto or a list"]),
    # 1.0 would make the cross-entropy's targets uniform: the labels would teach nothing
    ("label-smoothing-one", KD + "loss: {label_smoothing: 1.0}\n", [], "loss.label_smoothing",
     ["loss.label_smoothing:", "less than 1", "got 1.0", "a number >= 0 and < 1"]),
    ("label-smoothing-negative", KD, ["loss.label_smoothing=-0.1"], "loss.label_smoothing",
     ["greater than or equal to 0", "a number >= 0 and < 1"]),
    ("input-size-type", MINIMAL + "data: {input_size: big}\n", [], "data.input_size", ["a list of 3 integers"]),
    ("input-size-short", MINIMAL + "data: {input_size: [3, 32]}\n", [], "data.input_size.2", ["item 2 is missing"]),
    ("unknown-dataset", MINIMAL + "data: {dataset: cifar100}\n", [], "data.dataset",
     ["'cifar100'", "digits, fashion-mnist, imagefolder, synthetic, torchvision:NAME"]),
    ("bad-device", MINIMAL + "runtime: {device: gpu}\n", [], "runtime.device", ["auto, cpu, cuda, cuda:N"]),
    ("channels-last-word", MINIMAL + "runtime: {channels_last: maybe}\n", [], "runtime.channels_last",
     ["true/false or auto"]),
    ("missing-name", "student: {model: 'timm:resnet18'}\n", [], "name", ["required key is missing"]),
    ("missing-student", "name: t\n", [], "student", ["required key is missing", "model, kwargs, pretrained, checkpoint"]),
    ("set-wrong-type", MINIMAL, ["schedule.epochs=many"], "schedule.epochs", ["valid integer", "'many'"]),
]


@pytest.mark.parametrize("text,overrides,path,fragments", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_specs(tmp_path, text, overrides, path, fragments):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text), overrides)
    assert info.value.path == path
    for fragment in fragments:
        assert fragment in info.value.message


def test_every_problem_listed_one_per_line():
    with pytest.raises(SpecError) as info:
        load_spec({"name": "t", "student": {"model": "timm:resnet18"},
                   "data": {"batch_size": 0, "augment": "x"}, "optim": {"lr": -1}})
    lines = info.value.message.splitlines()
    assert [line.split(":")[0] for line in lines] == ["data.batch_size", "data.augment", "optim.lr"]
    assert info.value.path == "data.batch_size"


def test_a_list_of_any_length_is_not_described_as_a_pair():
    """data.mean is ``tuple[float, ...]`` (one value per channel): the allowed form read "a list
    of 2 numbers", counting the Ellipsis as an item; a fixed tuple keeps its count."""
    with pytest.raises(SpecError) as info:
        load_spec({"name": "t", "student": {"model": "timm:resnet18"}, "data": {"mean": "x", "input_size": "big"}})
    lines = dict(line.split(": ", 1) for line in info.value.message.splitlines())
    assert lines["data.mean"].endswith("allowed: a list of numbers or null"), lines["data.mean"]
    assert lines["data.input_size"].endswith("allowed: a list of 3 integers or null"), lines["data.input_size"]


def test_more_than_ten_problems_are_counted_not_listed():
    data = {k: "x" for k in ("batch_size", "fraction", "augment", "input_size", "num_classes", "samples", "seq_len",
                             "val_fraction", "mean", "std")}
    with pytest.raises(SpecError) as info:
        load_spec({"name": "t", "student": {"model": "timm:resnet18"}, "data": data,
                   "optim": {"lr": "x", "momentum": "x"}})
    lines = info.value.message.splitlines()
    assert len(lines) == 11 and lines[-1] == "... and 2 more problems"
    assert all(line.startswith(("data.", "optim.")) for line in lines[:10])


def test_an_item_of_a_union_names_the_form_it_should_have():
    """decompose.cuts is 'auto' or a list of pairs: an item that is no pair is named at its index
    with the pair's keys, not as a mismatch of the whole union."""
    with pytest.raises(SpecError) as info:
        load_spec({"name": "t", "student": {"model": "timm:resnet18"}, "decompose": {"cuts": [1]}})
    assert info.value.path == "decompose.cuts.0"
    assert info.value.message == ("decompose.cuts.0: must be a valid dictionary or instance of CutPair (got 1); "
                                  "allowed: {teacher, student} mapping")


def test_short_cuts_long_values_and_counts_them():
    assert short("abc") == "abc" and short(5) == "5"
    text = short("y" * 1000)
    assert text == "y" * MAX_SHOWN + "... (1,000 characters)"


def test_values_in_error_messages_are_cut_short(tmp_path):
    from _runtime_helpers import tiny_spec

    with pytest.raises(SpecError) as info:
        load_spec(tiny_spec(tmp_path / "run", "kd"), ["student.kwargs=[" + ", ".join(["12345"] * 2000) + "]"])
    assert len(info.value.message) < 400 and "characters)" in info.value.message

"""kdgraph.spec.schema: the spec's defaults, the DESIGN example, the resolved dict round trip and
the cross-field checks (each refused with the path and words the user needs), against values
written out here."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdgraph.errors import SpecError
from kdgraph.spec import Spec, load_spec, max_recompositions

from test_spec_loader import MINIMAL, write  # the minimal spec, a spec file written here
KD = "name: tiny\nteacher: {model: 'timm:resnet34'}\nstudent: {model: 'timm:resnet18'}\n"
KD_DICT = {"name": "t", "teacher": {"model": "timm:resnet34"}, "student": {"model": "timm:resnet18"}}

# DESIGN.md's example; the dataset is written as torchvision:CIFAR100 (the allowed spelling).
DESIGN_EXAMPLE = """
name: resnet34-to-resnet18
seed: 0
teacher: {model: "timm:resnet34", kwargs: {num_classes: 100}, checkpoint: runs/t34/model.safetensors}
student: {model: "timm:resnet18", kwargs: {num_classes: 100}}
data: {dataset: "torchvision:CIFAR100", root: data, input_size: [3, 32, 32], batch_size: 128, fraction: 1.0}
decompose: {blocks: 5, cuts: auto, projector: conv1x1}
schedule: {method: stablekd, recompositions: 2, epochs: 60}
loss: {kl_weight: 1.0, temperature: 1.0, feature: mse}
optim: {name: sgd, lr: 0.5, momentum: 0.9, weight_decay: 5.0e-4, lr_schedule: stage_cyclic}
runtime: {device: auto, precision: bf16, compile: false, channels_last: true}
output: runs/resnet34-to-resnet18
"""


def _tiny(tmp_path, method="kd", **sections):
    from _runtime_helpers import tiny_spec

    return tiny_spec(tmp_path / "run", method, **sections)


def test_defaults_resolve(tmp_path):
    spec = load_spec(write(tmp_path, KD))
    assert spec.schedule.method == "stablekd"
    assert spec.schedule.recompositions == 2 and spec.schedule.epochs == 60
    assert spec.decompose.blocks == 5 and spec.decompose.cuts == "auto"
    assert spec.data.dataset == "digits" and spec.data.batch_size == 128 and spec.data.input_size is None
    assert spec.optim.name == "sgd" and spec.optim.lr == 0.1 and spec.optim.betas == (0.9, 0.999)
    assert spec.runtime.channels_last == "auto" and spec.runtime.checkpoint_every == 0
    assert spec.output_dir == Path("runs") / "tiny"
    assert spec.source_dir == tmp_path.resolve()


def test_no_teacher_defaults_to_supervised():
    spec = load_spec({"name": "t", "student": {"model": "timm:resnet18"}})
    assert spec.teacher is None
    assert spec.schedule.method == "supervised"


def test_design_example_parses(tmp_path):
    spec = load_spec(write(tmp_path, DESIGN_EXAMPLE))
    assert spec.teacher is not None and spec.teacher.checkpoint == Path("runs/t34/model.safetensors")
    assert spec.student.kwargs == {"num_classes": 100}
    assert spec.data.input_size == (3, 32, 32)
    assert spec.runtime.precision == "bf16" and spec.runtime.channels_last is True
    assert spec.optim.lr == 0.5
    assert spec.output_dir == Path("runs/resnet34-to-resnet18")


def test_resolved_dict_round_trips():
    spec = load_spec({"name": "t", "student": {"model": "timm:resnet18"}, "data": {"input_size": [1, 8, 8]}})
    resolved = spec.to_dict()
    assert resolved["schedule"]["method"] == "supervised"
    assert resolved["data"]["input_size"] == [1, 8, 8]
    assert resolved["loss"]["temperature"] == 1.0
    assert Spec.model_validate(resolved) == spec


def test_explicit_cuts_parse():
    cuts = [{"teacher": f"layer{i}", "student": f"stages.{i}"} for i in range(1, 5)]
    spec = load_spec({"name": "t", "teacher": {"model": "timm:resnet34"}, "student": {"model": "timm:resnet18"},
                      "decompose": {"cuts": cuts}})
    assert [c.student for c in spec.decompose.cuts] == ["stages.1", "stages.2", "stages.3", "stages.4"]


def test_stage_epochs_valid():
    spec = load_spec(KD_DICT | {"schedule": {"epochs": 10, "stage_epochs": [3, 3, 4]}})
    assert spec.schedule.stage_epochs == [3, 3, 4]
    kd = load_spec(KD_DICT | {"schedule": {"method": "kd", "epochs": 7, "stage_epochs": [7], "recompositions": 9}})
    assert kd.schedule.stage_epochs == [7]  # one training stage: recompositions are ignored outside stablekd


@pytest.mark.parametrize("blocks,expected", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4)])
def test_max_recompositions(blocks, expected):
    assert max_recompositions(blocks) == expected


@pytest.mark.parametrize("value", [0.0, 0.1, 0.99])
def test_label_smoothing_below_one_is_accepted(tmp_path, value):
    spec = load_spec(write(tmp_path, KD + f"loss: {{label_smoothing: {value}}}\n"))
    assert spec.loss.label_smoothing == value


@pytest.mark.parametrize("command", ["plan", "cache", "train"])
def test_a_teacher_cache_that_is_a_file_is_a_spec_error(tmp_path, command):
    """`kdgraph cache` with teacher.cache naming a file died with FileExistsError."""
    from _runtime_helpers import run_cli, tiny_spec, write_spec

    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    spec = write_spec(tiny_spec(tmp_path / "run", "kd"), tmp_path / "spec.yaml")
    args = [command, str(spec), "--set", f"teacher.cache={afile}", *(["--epochs", "1"] if command == "cache" else [])]
    proc = run_cli(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "teacher.cache: a teacher cache is a folder, and this is a file" in " ".join(proc.stderr.split())
    assert afile.read_text() == "mine" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("method,loss,named", [
    ("kd", {"ce_weight": 0, "kl_weight": 0}, "loss.ce_weight, loss.kl_weight"),
    ("kd", {"logit": "dkd", "ce_weight": 0, "dkd_alpha": 0, "dkd_beta": 0}, "loss.dkd_alpha, loss.dkd_beta"),
    ("kd", {"logit": "dist", "ce_weight": 0, "dist_beta": 0, "dist_gamma": 0}, "loss.dist_beta, loss.dist_gamma"),
    ("kd+mse", {"ce_weight": 0, "kl_weight": 0, "feature_weight": 0}, "loss.feature_weight"),
    ("stablekd", {"ce_weight": 0, "kl_weight": 0}, "loss.kl_weight"),
])
def test_every_loss_weight_at_zero_is_refused(tmp_path, method, loss, named):
    """ce_weight=0 kl_weight=0 trained on a zero loss to 10 % and exited 0."""
    with pytest.raises(SpecError, match=f"weight 0, so it would train on a zero loss.*{named}"):
        load_spec(_tiny(tmp_path, method, loss=loss))


@pytest.mark.parametrize("method,loss", [
    ("kd", {"ce_weight": 0}), ("kd", {"kl_weight": 0}), ("kd+mse", {"ce_weight": 0, "kl_weight": 0}),
    ("kd", {"ce_weight": 0, "kl_weight": 0, "pairs": [{"student": "layer1", "teacher": "layer1"}]}),
])
def test_one_weighed_term_is_enough(tmp_path, method, loss):
    load_spec(_tiny(tmp_path, method, loss=loss))


def test_the_same_layer_pair_twice_is_refused(tmp_path):
    pair = {"student": "layer2", "teacher": "layer2"}
    with pytest.raises(SpecError, match=r"loss.pairs.1: the same pair as pairs.0 .*would count twice"):
        load_spec(_tiny(tmp_path, loss={"pairs": [pair, {**pair, "weight": 2.0}]}))
    load_spec(_tiny(tmp_path, loss={"pairs": [pair, {**pair, "loss": "dfm"}]}))  # another loss: another term


@pytest.mark.parametrize("method,loss,reader", [("kd", {"pairs": [{"student": "layer2", "teacher": "layer2"}]},
                                                 "loss.pairs"),
                                                ("kd+mse", {}, "schedule.method kd\\+mse")])
def test_a_teacher_cache_no_stage_would_replay_is_refused(tmp_path, method, loss, reader):
    raw = _tiny(tmp_path, method, loss=loss)
    raw["teacher"]["cache"] = str(tmp_path / "cache")
    with pytest.raises(SpecError, match=f"teacher.cache: {reader} reads the teacher's features in every stage"):
        load_spec(raw)


@pytest.mark.parametrize("method", ["kd", "supervised"])
def test_projected_adapters_with_a_method_that_compares_no_features_are_refused(tmp_path, method):
    """kd listed PCA adapters (and fitted them) that no loss used."""
    raw = _tiny(tmp_path, method, decompose={"blocks": 4, "adapters": "projected"})
    with pytest.raises(SpecError, match=f"decompose.adapters: schedule.method {method} compares no block features"):
        load_spec(raw)
    load_spec(_tiny(tmp_path, "stablekd", decompose={"blocks": 4, "adapters": "projected"}))


def test_a_temperature_that_overflows_the_logits_is_refused(tmp_path):
    """temperature 1e-300 divided the logits into inf: a NaN loss whose advice was to lower the lr."""
    with pytest.raises(SpecError, match=r"loss.temperature: .*greater than or equal to 0.001"):
        load_spec(_tiny(tmp_path, loss={"temperature": 1e-300}))
    load_spec(_tiny(tmp_path, loss={"temperature": 1e-3}))


def test_a_tokenizer_on_a_dataset_that_is_not_text_is_refused(tmp_path):
    """data.tokenizer only tokenises the text dataset: elsewhere it was silently ignored."""
    from _runtime_helpers import run_cli, tiny_spec, write_spec

    tok = tmp_path / "tok"
    tok.mkdir()
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, MINIMAL), [f"data.tokenizer={tok}"])
    assert info.value.path == "data.tokenizer" and "digits is not text" in info.value.message
    assert load_spec(write(tmp_path, MINIMAL), ["data.dataset=text", "data.seq_len=8",
                                                f"data.tokenizer={tok}"]).data.tokenizer == tok
    spec = write_spec(tiny_spec(tmp_path / "run", "kd"), tmp_path / "kd.yaml")
    proc = run_cli("plan", str(spec), "--set", f"data.tokenizer={tok}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "data.tokenizer: tokenises the text dataset" in proc.stderr and not (tmp_path / "run").exists()


def test_output_dir_and_located_at_leave_the_spec_alone(tmp_path):
    spec = load_spec({"name": "t", "student": {"model": "timm:resnet18"}})
    assert spec.output_dir == Path("runs") / "t" and spec.source_dir is None
    moved = spec.located_at(tmp_path)
    assert moved.source_dir == tmp_path and spec.source_dir is None  # a copy; this one unchanged
    assert moved.to_dict() == spec.to_dict()  # where it was read from is no field of the spec
    assert load_spec({**KD_DICT, "output": str(tmp_path / "o")}).output_dir == tmp_path / "o"


@pytest.mark.parametrize("override, path", [("optim.lr=.inf", "optim.lr"), ("loss.kl_weight=.nan", "loss.kl_weight"),
                                            ("data.mean=[.inf]", "data.mean.0")])
def test_no_number_anywhere_may_be_inf_or_nan(override, path):
    """``--set optim.lr=.inf`` would train all-NaN and exit 0."""
    with pytest.raises(SpecError) as info:
        load_spec(KD_DICT, [override])
    assert info.value.path == path and "finite number" in info.value.message, info.value.message

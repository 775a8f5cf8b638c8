"""The registries: one list per kind, read by the spec's validation, its error messages and
the runtime; a registered entry is valid everywhere at once."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _runtime_helpers import KW, ROOT, tiny_spec, train_here
from torch import nn

from kdgraph.errors import SpecError
from kdgraph.registry import (
    AUGMENTATIONS,
    DATASETS,
    LOGIT_LOSSES,
    METHODS,
    MODEL_SOURCES,
    SCHEDULES,
    Augmentation,
    Method,
    Registry,
    UnknownName,
    dataset_choices,
    register_dataset,
    register_model_source,
)
from kdgraph.spec import load_spec


def test_registry_registers_in_order_and_names_the_kind_when_a_name_is_unknown():
    colours = Registry[str]("colour")
    colours.register("red", "#f00")

    @colours.register("green")
    def green() -> str:
        return "#0f0"

    assert colours.names() == ["red", "green"] and list(colours) == ["red", "green"]
    assert "red" in colours and "blue" not in colours and colours.get("green") is green
    with pytest.raises(ValueError, match="colour 'red' is already registered"):
        colours.register("red", "#e00")
    colours.register("red", "#e00", overwrite=True)
    assert colours.get("red") == "#e00" and colours.names() == ["red", "green"]
    with pytest.raises(UnknownName, match="unknown colour 'blue'; registered: red, green"):
        colours.get("blue")
    assert colours.unregister("red") == "#e00" and colours.names() == ["green"]


def test_builtin_entries():
    assert METHODS.names() == ["stablekd", "kd", "kd+mse", "supervised"]
    assert [name for name in METHODS if not METHODS.get(name).teacher] == ["supervised"]
    assert [name for name in METHODS if METHODS.get(name).decomposes] == ["stablekd"]
    assert [name for name in METHODS if METHODS.get(name).feature_losses] == ["kd+mse"]
    assert SCHEDULES.names() == ["stage_cyclic", "onecycle", "cosine", "constant"]
    assert AUGMENTATIONS.names() == ["none", "crop", "crop+flip"]
    assert MODEL_SOURCES.names()[:3] == ["timm", "torchvision", "module"]
    assert DATASETS.names()[:5] == ["digits", "fashion-mnist", "imagefolder", "synthetic", "torchvision"]


def test_spec_and_registry_import_without_torch():
    code = "import kdgraph.spec, kdgraph.registry, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_spec_validation_sees_every_built_in_name_without_torch():
    """The built-in names are declared in kdgraph.registry; validating a spec that uses
    them imports neither torch nor the modules that implement them."""
    code = """if True:
        import sys
        from kdgraph.spec import load_spec
        from kdgraph.registry import DATASETS, LOGIT_LOSSES, METHODS, MODEL_SOURCES, SCHEDULES, TASKS
        kw = {"width": 8, "num_classes": 10}
        tiny = {"model": "module:kdgraph.zoo:resnet_tiny_student", "kwargs": kw}
        for method in METHODS.names():
            spec = load_spec({"name": "t", "student": tiny, "schedule": {"method": method},
                              **({"teacher": tiny} if METHODS.get(method).teacher else {})})
            assert spec.schedule.method == method
        for logit in LOGIT_LOSSES.names():
            spec = load_spec({"name": "t", "student": tiny, "teacher": tiny, "schedule": {"method": "kd"},
                              "loss": {"logit": logit}})
            assert spec.loss.logit == logit
        for task in ("classification", "dense"):
            assert load_spec({"name": "t", "student": tiny, "task": task}).task == task
        assert load_spec({"name": "t", "student": tiny, "task": "denoise", "denoise": {}}).task == "denoise"
        assert TASKS.names() == ["classification", "dense", "denoise", "causal_lm"]
        for dataset in ("digits", "fashion-mnist-seg", "torchvision:CIFAR10"):
            load_spec({"name": "t", "data": {"dataset": dataset},
                       "teacher": {"model": "timm:resnet18", "pretrained": True},
                       "student": {"model": "torchvision:resnet18"}})
        for schedule in SCHEDULES.names():
            load_spec({"name": "t", "student": {"model": "module:kdgraph.zoo:resnet_tiny_student", "kwargs": kw},
                       "optim": {"lr_schedule": schedule}, "schedule": {"method": "supervised"}})
        heavy = [m for m in ("torch", "kdgraph.models", "kdgraph.data", "kdgraph.schedules", "kdgraph.tasks.create")
                 if m in sys.modules]
        assert not heavy, heavy
        """
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_every_declared_name_is_registered_by_its_home_module():
    """A name declared in kdgraph.registry and never implemented fails here, not in a run."""
    import kdgraph.data
    import kdgraph.models
    import kdgraph.schedules  # noqa: F401  (each registers its entries on import)
    import kdgraph.tasks.create  # noqa: F401
    from kdgraph.registry import PRETRAINED_SOURCES, TASKS

    for registry in (MODEL_SOURCES, PRETRAINED_SOURCES, DATASETS, SCHEDULES, METHODS, AUGMENTATIONS, TASKS):
        assert registry.unregistered() == [], registry.kind


def test_a_declared_name_is_valid_before_its_entry_is_registered():
    colours = Registry[str]("colour", declared=("red",), home="a colour module")
    assert colours.names() == ["red"] and "red" in colours
    with pytest.raises(LookupError, match="colour 'red' is declared but not registered yet: a colour module"):
        colours.get("red")
    colours.register("green", "#0f0")
    colours.register("red", "#f00")
    assert colours.names() == ["red", "green"] and colours.get("red") == "#f00"
    with pytest.raises(ValueError, match="colour 'red' is already registered"):
        colours.register("red", "#e00")


def _ramp(data_spec, seed):
    """A two-class dataset: dark and bright 1x8x8 images."""
    x = torch.cat([torch.full((40, 1, 8, 8), 10.0), torch.full((40, 1, 8, 8), 200.0)])
    x = x + torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) * 20
    y = torch.cat([torch.zeros(40), torch.ones(40)]).long()
    return x, y, x[::4], y[::4], 2, "none"


def test_registered_dataset_passes_load_spec_and_trains(tmp_path):
    from kdgraph.data import RawSplits

    register_dataset("ramp-test", lambda data_spec, seed: RawSplits(*_ramp(data_spec, seed)))
    try:
        raw = tiny_spec(tmp_path / "run", "supervised", blocks=2, epochs=1, fraction=1.0,
                        data={"dataset": "ramp-test", "input_size": [1, 8, 8]})
        raw["student"]["kwargs"]["num_classes"] = 2
        spec = load_spec(raw)
        assert spec.data.dataset == "ramp-test"
        summary = train_here(spec)
        assert summary["epochs"] == 1 and (tmp_path / "run" / "student.safetensors").is_file()
    finally:
        DATASETS.unregister("ramp-test")
    with pytest.raises(SpecError, match="data.dataset"):
        load_spec(raw)


def test_registered_model_source_passes_load_spec_and_trains(tmp_path):
    from kdgraph import zoo

    register_model_source("regtest", lambda name, kwargs: getattr(zoo, name)(**kwargs))
    try:
        raw = tiny_spec(tmp_path / "run", "kd", blocks=2, epochs=1, student="regtest:resnet_tiny_student")
        spec = load_spec(raw)
        assert spec.student.model == "regtest:resnet_tiny_student"
        summary = train_here(spec)
        assert summary["epochs"] == 1 and (tmp_path / "run" / "student.safetensors").is_file()
    finally:
        MODEL_SOURCES.unregister("regtest")
    with pytest.raises(SpecError, match="unknown model source 'regtest'"):
        load_spec(raw)


# (YAML path, section, key, registry, what the registry's new entry is, the allowed names)
CHOICES = [
    ("schedule.method", "schedule", "method", METHODS,
     Method("regtest", teacher=True, decomposes=False, feature_losses=False, summary="a test method"),
     METHODS.names),
    ("optim.lr_schedule", "optim", "lr_schedule", SCHEDULES, lambda schedule, step: schedule.peak_lr,
     SCHEDULES.names),
    ("data.augment", "data", "augment", AUGMENTATIONS,
     Augmentation("regtest", crop=False, flip=False, summary="a test augmentation"),
     lambda: ["auto", *AUGMENTATIONS.names()]),
    ("data.dataset", "data", "dataset", DATASETS, _ramp, dataset_choices),
]


@pytest.mark.parametrize("path,section,key,registry,entry,allowed", CHOICES, ids=[c[0] for c in CHOICES])
def test_allowed_values_are_the_registry_names(path, section, key, registry, entry, allowed):
    raw = {"name": "t", "teacher": {"model": "module:kdgraph.zoo:resnet_tiny_teacher", "kwargs": KW},
           "student": {"model": "module:kdgraph.zoo:resnet_tiny_student", "kwargs": KW}, section: {key: "nope"}}
    registry.register("regtest", entry)
    try:
        with pytest.raises(SpecError) as info:
            load_spec(raw)
        names = allowed()
        assert names[-1] == "regtest"
        assert info.value.path == path
        assert info.value.message.endswith(f"(got 'nope'); allowed: {', '.join(names)}")
        raw[section][key] = "regtest"
        assert getattr(getattr(load_spec(raw), section), key) == "regtest"
    finally:
        registry.unregister("regtest")
    assert "regtest" not in allowed()


def test_model_source_error_lists_the_registered_sources():
    register_model_source("regtest", lambda name, kwargs: nn.Identity())
    try:
        with pytest.raises(SpecError) as info:
            load_spec({"name": "t", "student": {"model": "hub:x"}})
    finally:
        MODEL_SOURCES.unregister("regtest")
    assert "allowed: timm:NAME, torchvision:NAME, module:pkg.mod:factory, diffusers:NAME, transformers:NAME, regtest:NAME" in info.value.message


def test_json_schema_lists_the_registry_names():
    from kdgraph.spec import Spec

    defs = Spec.model_json_schema()["$defs"]
    assert defs["ScheduleSpec"]["properties"]["method"]["enum"] == METHODS.names()
    assert defs["OptimSpec"]["properties"]["lr_schedule"]["enum"] == SCHEDULES.names()
    assert defs["DataSpec"]["properties"]["augment"]["enum"] == ["auto", *AUGMENTATIONS.names()]
    assert defs["DataSpec"]["properties"]["dataset"]["examples"] == dataset_choices()
    assert defs["LossSpec"]["properties"]["logit"]["enum"] == LOGIT_LOSSES.names()


def test_spec_field_descriptions_name_every_built_in_choice():
    """`kdgraph schema` and the JSON schema describe each choice field in prose; every built-in
    name of its registry must be there (a dataset added without its description fails here)."""
    from kdgraph.spec.schema import DataSpec, LossSpec, ModelSpec, OptimSpec, ScheduleSpec

    fields = [(DataSpec, "dataset", DATASETS.names()), (DataSpec, "augment", AUGMENTATIONS.names()),
              (ScheduleSpec, "method", METHODS.names()), (OptimSpec, "lr_schedule", SCHEDULES.names()),
              (ModelSpec, "model", MODEL_SOURCES.names()), (LossSpec, "logit", LOGIT_LOSSES.names())]
    for model, field, names in fields:
        description = model.model_fields[field].description
        assert names, field
        missing = [n for n in names if n not in description]
        assert not missing, f"{model.__name__}.{field}: {missing} not described in {description!r}"

"""The recipes of issue 22 through the spec, the compiler and one training step: loss.logit
chooses the head loss node, its params come from loss.*, bad combinations are refused with
one line naming the YAML path, and a step's terms equal the recipe's formula module (tested
against the paper's formula in test_logit_losses) on the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from _runtime_helpers import ROOT, tiny_spec, train_here

from kdgraph.compiler import compile_spec
from kdgraph.errors import PlanError, SpecError
from kdgraph.losses import DIST, DKD, KLDivergence, LogitStandardization
from kdgraph.runtime.distiller import Distiller
from kdgraph.registry import LOGIT_LOSSES
from kdgraph.spec import load_spec
from kdgraph.spec.schema import LossSpec


def _head(spec: dict) -> dict:
    c = compile_spec(load_spec(spec), materialize=False)
    return dict(c.graph.nodes["head_loss"])


@pytest.mark.parametrize("loss, entry, terms, params", [
    ({}, "kd", ["ce", "kl"], {"ce_weight": 1.0, "kl_weight": 1.0, "temperature": 1.0, "label_smoothing": 0.0,
                              "standardize": False}),
    ({"logit": "kl", "standardize": True, "temperature": 2.0, "kl_weight": 9.0}, "kd", ["ce", "kl"],
     {"ce_weight": 1.0, "kl_weight": 9.0, "temperature": 2.0, "label_smoothing": 0.0, "standardize": True}),
    ({"logit": "dkd", "dkd_beta": 4.0, "dkd_warmup_epochs": 2.5, "temperature": 4.0}, "dkd", ["ce", "tckd", "nckd"],
     {"ce_weight": 1.0, "label_smoothing": 0.0, "alpha": 1.0, "beta": 4.0, "temperature": 4.0,
      "warmup_epochs": 2.5, "standardize": False}),
    ({"logit": "dist", "dist_gamma": 2.0, "ce_weight": 0.5}, "dist", ["ce", "inter", "intra"],
     {"ce_weight": 0.5, "label_smoothing": 0.0, "beta": 1.0, "gamma": 2.0, "temperature": 1.0,
      "standardize": False}),
])
def test_loss_logit_chooses_the_head_loss_node_and_its_params(loss, entry, terms, params):
    head = _head(tiny_spec(method="kd", loss=loss))
    assert (head["entry"], head["terms"], head["params"]) == (entry, terms, params)


def test_without_a_teacher_the_head_is_cross_entropy():
    assert _head(tiny_spec(method="supervised"))["entry"] == "ce"


def test_the_plan_names_the_head_loss_and_its_params():
    from rich.console import Console

    from kdgraph.render import plan_view

    c = compile_spec(load_spec(tiny_spec(method="kd", loss={"logit": "dkd", "dkd_beta": 4.0})), materialize=False)
    console = Console(width=200, record=True)
    console.print(plan_view(c))
    text = console.export_text()
    assert "head_loss: dkd (ce_weight 1.0, label_smoothing 0.0, alpha 1.0, beta 4.0, temperature 1.0, " \
           "warmup_epochs 0.0, standardize False)" in text
    nodes = {n["id"]: n for n in c.to_dict()["graph"]["nodes"]}
    assert nodes["head_loss"]["entry"] == "dkd" and nodes["head_loss"]["params"]["beta"] == 4.0
    json.dumps(c.to_dict())


@pytest.mark.parametrize("sections, message", [
    ({"loss": {"logit": "dkd", "kl_weight": 2.0}},
     "loss.kl_weight: kl_weight is a parameter of loss.logit kl, and loss.logit is dkd (got 2.0); "
     "allowed: loss.logit: kl, or no kl_weight"),
    ({"loss": {"dist_beta": 2.0}},
     "loss.dist_beta: dist_beta is a parameter of loss.logit dist, and loss.logit is kl (got 2.0); "
     "allowed: loss.logit: dist, or no dist_beta"),
    ({"loss": {"logit": "mse"}}, "loss.logit: unknown logit loss (got 'mse'); allowed: kl, dkd, dist"),
    ({"loss": {"dkd_alpha": -1.0}}, "loss.dkd_alpha: must be greater than or equal to 0 (got -1.0)"),
    ({"loss": {"ce_weight": -0.5}}, "loss.ce_weight: must be greater than or equal to 0 (got -0.5)"),
    ({"loss": {"dkd_warmup_epochs": -1}}, "loss.dkd_warmup_epochs: must be greater than or equal to 0 (got -1)"),
    ({"loss": {"logit": "dkd"}, "data": {"mixup": {"cutmix_alpha": 1.0}}},
     "data.mixup: loss.logit dkd needs each sample's class, and mixup gives mixed soft labels"),
    ({"loss": {"logit": "dist"}, "runtime": {"micro_batches": 2}},
     "runtime.micro_batches: loss.logit dist relates the samples of a batch; micro-batches would each be a "
     "batch of their own (got 2); allowed: 1 with loss.logit dist"),
    ({"data": {"mixup": {"mixup_alpha": 0.0}}},
     "data.mixup.mixup_alpha: mixup_alpha and cutmix_alpha are both 0: nothing would be mixed"),
    ({"data": {"mixup": {"prob": 1.5}}}, "data.mixup.prob: must be less than or equal to 1"),
])
def test_bad_recipes_are_one_line_errors_naming_the_yaml_path(sections, message):
    with pytest.raises(SpecError) as e:
        load_spec(tiny_spec(method="kd", **sections))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("loss, key", [({"ce_weight": 0.0}, "ce_weight"), ({"logit": "dkd"}, "logit"),
                                       ({"standardize": True}, "standardize")])
def test_teacher_losses_without_a_teacher_are_refused(loss, key):
    with pytest.raises(SpecError, match=rf"^loss.{key}: {key} shapes the loss against a teacher's logits; "
                                        "supervised trains with cross-entropy alone"):
        load_spec(tiny_spec(method="supervised", loss=loss))


@pytest.mark.parametrize("logit", LOGIT_LOSSES.names())
def test_a_spec_writing_out_the_defaults_stays_valid_with_any_logit_loss(logit):
    """Every logit loss's own fields written out at their defaults, beside any logit loss: the
    same spec as without them; one of another loss's fields off its default is refused."""
    defaults = LossSpec().model_dump()
    own = {name: LOGIT_LOSSES.get(name).own for name in LOGIT_LOSSES.names()}
    written = {field: defaults[field] for fields in own.values() for field in fields}
    plain = load_spec(tiny_spec(method="kd", loss={"logit": logit}))
    assert load_spec(tiny_spec(method="kd", loss={**written, "logit": logit})).loss == plain.loss
    others = [field for name, fields in own.items() if name != logit for field in fields]
    field = others[0]
    with pytest.raises(SpecError, match=field):
        load_spec(tiny_spec(method="kd", loss={"logit": logit, field: defaults[field] + 1}))


def test_mixup_with_per_pixel_labels_is_refused_by_the_plan():
    spec = load_spec(ROOT / "specs" / "fashion-unet.yaml", ["data.mixup.mixup_alpha=1.0"])
    with pytest.raises(PlanError, match=r"^data.mixup: mixup mixes one class label per image; this student "
                                        "predicts a class per pixel"):
        compile_spec(spec, materialize=False, allow_missing_weights=True)


# -- one training step: the terms the distiller returns are the recipe's formula ---------------

def _step(loss: dict, progress=None):
    """One forward of a kd plan: the distiller's terms, and the student's and teacher's logits
    and labels of the same batch computed beside it."""
    torch.manual_seed(0)
    c = compile_spec(load_spec(tiny_spec(method="kd", loss=loss)))
    d = Distiller(c)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    terms = d(x, y, progress=progress)
    with torch.no_grad():
        s, t = c.student.model(x), c.teacher.model.eval()(x)
    return terms, s, t, y


def test_a_dkd_step_gives_the_dkd_module_on_the_same_logits():
    terms, s, t, y = _step({"logit": "dkd", "dkd_alpha": 2.0, "dkd_beta": 8.0, "temperature": 4.0,
                            "dkd_warmup_epochs": 4.0}, progress=torch.tensor(1.0))
    assert list(terms) == ["ce", "tckd", "nckd"]
    want = DKD(2.0, 8.0, 4.0).terms(s, t, y)
    torch.testing.assert_close(terms["tckd"].detach(), 0.25 * want["tckd"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["nckd"].detach(), 0.25 * want["nckd"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["ce"].detach(), torch.nn.functional.cross_entropy(s, y))


def test_a_dist_step_and_a_standardized_kl_step_give_their_modules():
    terms, s, t, y = _step({"logit": "dist", "dist_beta": 2.0, "temperature": 2.0, "ce_weight": 0.0})
    want = DIST(2.0, 1.0, 2.0).terms(s, t)
    assert list(terms) == ["ce", "inter", "intra"] and terms["ce"].item() == 0.0
    torch.testing.assert_close(terms["inter"].detach(), want["inter"])
    torch.testing.assert_close(terms["intra"].detach(), want["intra"])
    terms, s, t, y = _step({"standardize": True, "kl_weight": 9.0, "temperature": 2.0})
    torch.testing.assert_close(terms["kl"].detach(), 9.0 * LogitStandardization(KLDivergence(2.0))(s, t))


def test_training_with_dkd_logs_its_terms(tmp_path):
    summary = train_here(load_spec(tiny_spec(tmp_path / "run", method="kd", epochs=1, loss={"logit": "dkd"})))
    assert summary["epochs"] == 1
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r.get("kind") == "step"]
    assert steps and all({"ce", "tckd", "nckd"} <= set(r) for r in steps)
    assert all(r["loss"] == pytest.approx(r["ce"] + r["tckd"] + r["nckd"], abs=3e-6) for r in steps)


@pytest.mark.parametrize("logit", ["dkd", "dist"])
def test_per_pixel_logits_are_per_pixel_samples_in_a_dense_step(logit):
    """The U-Net pair (2 classes per pixel): the head terms are the recipe's module on the
    logits with every pixel a sample, as the KL term is."""
    spec = load_spec(ROOT / "specs" / "fashion-unet.yaml", [f"loss.logit={logit}", "schedule.method=kd"])
    torch.manual_seed(0)
    c = compile_spec(spec, allow_missing_weights=True)
    x, y = torch.randn(2, *c.input_size), torch.randint(0, 2, (2, *c.input_size[1:]))
    terms = Distiller(c)(x, y)
    with torch.no_grad():
        s, t = c.student.model(x), c.teacher.model.eval()(x)
    want = DKD(1.0, 8.0, 1.0).terms(s, t, y) if logit == "dkd" else DIST(1.0, 1.0, 1.0).terms(s, t)
    for name, value in want.items():
        torch.testing.assert_close(terms[name].detach(), value)

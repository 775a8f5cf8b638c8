"""kdgraph.lm.prune: a student initialised from its teacher's layers (student.from_teacher_layers).

Independent truth: the teacher's own parameters, read by their transformers names
(``lm.model.layers.{j}.…``), and the teacher's own eager logits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from kdgraph.compiler import compile_spec  # noqa: E402
from kdgraph.errors import SpecError  # noqa: E402
from kdgraph.lm.prune import init_from_teacher_layers, kept_layers  # noqa: E402
from kdgraph.lm.source import create_causal_lm  # noqa: E402
from kdgraph.spec import Spec, load_spec  # noqa: E402
from kdgraph.spec.schema import EveryLayer  # noqa: E402

LLAMA = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 5,
         "num_attention_heads": 4, "num_key_value_heads": 2}
GPT2 = {"vocab_size": 300, "n_embd": 32, "n_layer": 4, "n_head": 2, "n_positions": 32}


def _spec(keep, student_kwargs=None, **student) -> dict:
    return {"name": "p", "data": {"dataset": "text", "seq_len": 16},
            "teacher": {"model": "transformers:llama", "kwargs": LLAMA},
            "student": {"model": "transformers:llama", "kwargs": student_kwargs or {**LLAMA, "num_hidden_layers": 3},
                        "from_teacher_layers": keep, **student},
            "schedule": {"method": "kd"}, "decompose": {"blocks": 1}}


def _pair(kwargs: dict, layers: int, family: str = "llama"):
    torch.manual_seed(0)
    teacher = create_causal_lm(family, kwargs)
    layer_key = "num_hidden_layers" if family != "gpt2" else "n_layer"
    torch.manual_seed(1)
    return teacher, create_causal_lm(family, {**kwargs, layer_key: layers})


@pytest.mark.parametrize("family,kwargs,stack", [("llama", LLAMA, "lm.model.layers"),
                                                  ("gpt2", GPT2, "lm.transformer.h")])
def test_student_layer_i_is_teacher_layer_keep_i_parameter_for_parameter(family, kwargs, stack):
    teacher, student = _pair(kwargs, 3, family)
    keep = [0, 2, 3]
    note = init_from_teacher_layers(teacher, student, keep)
    t, s = teacher.state_dict(), student.state_dict()
    for i, j in enumerate(keep):
        mine = {k[len(f"{stack}.{i}."):]: v for k, v in s.items() if k.startswith(f"{stack}.{i}.")}
        theirs = {k[len(f"{stack}.{j}."):]: v for k, v in t.items() if k.startswith(f"{stack}.{j}.")}
        assert mine.keys() == theirs.keys() and mine
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), (i, j, name)
    rest = [k for k in s if not k.startswith(stack + ".")]
    assert rest and all(torch.equal(s[k], t[k]) for k in rest)  # embedding(s), final norm, head
    assert f"teacher layers {keep} ({stack})" in note


def test_keeping_every_layer_reproduces_the_teachers_logits_exactly():
    teacher, student = _pair(LLAMA, 5)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    assert not torch.equal(student(ids), teacher(ids))
    init_from_teacher_layers(teacher, student, list(range(5)))
    with torch.no_grad():
        assert torch.equal(student.eval()(ids), teacher.eval()(ids))


def test_every_kth_layer_is_the_kth_2kth_and_so_on():
    assert kept_layers(EveryLayer(every=2), 8) == [1, 3, 5, 7]
    assert kept_layers(EveryLayer(every=3), 8) == [2, 5]
    assert kept_layers(EveryLayer(every=1), 3) == [0, 1, 2]
    with pytest.raises(SpecError, match="every 9th layer of a teacher of 8 layers keeps none"):
        kept_layers(EveryLayer(every=9), 8)
    with pytest.raises(SpecError, match="teacher layer 8 is out of range: the teacher has 8 layers"):
        kept_layers([0, 8], 8)


def test_the_copy_is_refused_in_one_line_before_anything_is_copied():
    teacher, student = _pair(LLAMA, 2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(SpecError, match=r"3 teacher layers kept \(\[0, 1, 2\]\) for a student of 2 layers"):
        init_from_teacher_layers(teacher, student, [0, 1, 2])
    narrow = create_causal_lm("llama", {**LLAMA, "hidden_size": 32, "num_hidden_layers": 2})
    with pytest.raises(SpecError, match=r"outside the decoder layers: lm.model.embed_tokens.weight is 300×32 in the "
                                        r"student, 300×64 in the teacher; copied layers need the teacher's width"):
        init_from_teacher_layers(teacher, narrow, [1, 2])
    thin_mlp = create_causal_lm("llama", {**LLAMA, "intermediate_size": 32, "num_hidden_layers": 2})
    with pytest.raises(SpecError, match=r"student layer 0 from teacher layer 1: lm.model.layers.0.mlp.gate_proj.weight "
                                        r"is 32×64 in the student, 96×64 in the teacher"):
        init_from_teacher_layers(teacher, thin_mlp, [1, 2])
    other_vocab = create_causal_lm("llama", {**LLAMA, "vocab_size": 301, "num_hidden_layers": 2})
    with pytest.raises(SpecError, match=r"outside the decoder layers: lm.model.embed_tokens.weight is 301×64"):
        init_from_teacher_layers(teacher, other_vocab, [1, 2])
    with pytest.raises(SpecError, match="the teacher has no"):
        init_from_teacher_layers(teacher, create_causal_lm("gpt2", {**GPT2, "n_embd": 64, "n_layer": 2}), [0, 1])
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def _refused(raw: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message) as exc:
        load_spec(raw)
    assert "\n" not in str(exc.value)


def test_spec_fields_are_validated_in_one_line():
    assert load_spec(_spec([0, 2, 4])).student.from_teacher_layers == [0, 2, 4]
    assert load_spec(_spec({"every": 2}, {**LLAMA, "num_hidden_layers": 2})).student.from_teacher_layers.every == 2
    _refused(_spec([2, 1, 4]), "^student.from_teacher_layers: .*strictly increasing")
    _refused(_spec([]), "^student.from_teacher_layers: no layer kept")
    _refused(_spec([0, -1]), r"^student.from_teacher_layers: teacher layer indices count from 0")
    _refused(_spec({"every": 0}), r"^student.from_teacher_layers: every k-th layer needs k >= 1")
    _refused(_spec({"every": 2, "of": 3}), r"^student.from_teacher_layers")
    _refused(_spec([0, True]), r"^student.from_teacher_layers")
    _refused(_spec([0, 1], from_teacher=True), "^student.from_teacher_layers: .* and from from_teacher: true")
    _refused(_spec([0, 1], checkpoint="w.safetensors"), "^student.from_teacher_layers: .* and from student.checkpoint")
    _refused(_spec([0, 1], pretrained=True), "^student.from_teacher_layers: .* and from pretrained: true")
    no_teacher = _spec([0, 1])
    no_teacher.pop("teacher")
    no_teacher["schedule"] = {"method": "supervised"}
    _refused(no_teacher, "^student.from_teacher_layers: there is no teacher to copy layers from")
    on_teacher = _spec([0, 1])
    on_teacher["teacher"]["from_teacher_layers"] = [0]
    _refused(on_teacher, "^teacher.from_teacher_layers: the teacher starts from its own weights")
    cached = _spec([0, 1])
    cached["teacher"]["cache"] = "teacher-cache"
    _refused(cached, "^student.from_teacher_layers: the student copies the teacher's layers when it is built")
    timm = _spec([0, 1])
    timm["student"]["model"] = "timm:resnet18"
    _refused(timm, "^student.from_teacher_layers: copying decoder layers needs transformers: models")


def test_compile_copies_the_layers_and_notes_it_and_refuses_out_of_range(tmp_path):
    compiled = compile_spec(Spec.model_validate(_spec({"every": 2}, {**LLAMA, "num_hidden_layers": 2})))
    t, s = compiled.teacher.model.state_dict(), compiled.student.model.state_dict()
    for i, j in enumerate([1, 3]):
        assert torch.equal(s[f"lm.model.layers.{i}.mlp.up_proj.weight"], t[f"lm.model.layers.{j}.mlp.up_proj.weight"])
    assert any(n.startswith("student.from_teacher_layers: student layers 0..1") for n in compiled.notes)
    with pytest.raises(SpecError, match=r"^student.from_teacher_layers: teacher layer 5 is out of range"):
        compile_spec(Spec.model_validate(_spec([0, 1, 5])), materialize=False)


def test_the_shipped_pruned_spec_plans_with_the_copy():
    spec = load_spec("specs/shakespeare-lm-pruned.yaml")
    compiled = compile_spec(spec, allow_missing_weights=True, materialize=False)
    assert any(n.startswith("student.from_teacher_layers: ") for n in compiled.notes)

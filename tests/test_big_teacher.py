"""Teachers too big for one device: teacher.dtype (bf16/fp16 weights, computed in that dtype,
float32 outputs) and teacher.shard (FSDP2 over torchrun's ranks).

Independent truth: a second teacher built separately from the same weights file (``kdgraph.zoo``
+ safetensors), cast by hand (``ref.to(torch.bfloat16)(x.bfloat16()).float()``), and for the
sharded teacher the same teacher unsharded, on two gloo ranks of the CPU (FSDP2 runs there in
torch 2.14), and two torchrun trainings that differ in teacher.shard alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from kdgraph import zoo
from kdgraph.compiler import compile_spec
from kdgraph.errors import SpecError
from kdgraph.render import spec_table
from kdgraph.runtime.distiller import Distiller, frozen_teacher
from kdgraph.runtime.techniques import DistInfo, shard_teacher
from kdgraph.spec import load_spec
from kdgraph.teacher_cache import cache_key, differences

from _runtime_helpers import KW, ROOT, cli_env, tiny_spec, write_spec

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(7)
    model = zoo.resnet_tiny_teacher(**KW)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _reference(teacher_file) -> torch.nn.Module:
    ref = zoo.resnet_tiny_teacher(**KW)
    ref.load_state_dict(load_file(str(teacher_file)))
    return ref.eval()


def _spec(tmp_path, method="kd", teacher_file=None, **teacher):
    raw = tiny_spec(tmp_path, method, teacher_checkpoint=teacher_file)
    raw["teacher"].update(teacher)
    return load_spec(raw)


def _batch(n=8, seed=3):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# -- the spec ----------------------------------------------------------------------------------

def test_teacher_dtype_defaults_to_float32_and_is_validated(tmp_path):
    spec = _spec(tmp_path)
    assert (spec.teacher.dtype, spec.teacher.shard) == ("float32", False)
    with pytest.raises(SpecError) as info:
        _spec(tmp_path, dtype="float64")
    assert info.value.path == "teacher.dtype"
    with pytest.raises(SpecError) as info:
        _spec(tmp_path, shard="yes")
    assert info.value.path == "teacher.shard"


@pytest.mark.parametrize("section, key, method", [("runtime", "compile", "kd"), ("loss", "tpp", "stablekd")])
def test_sharded_teacher_refuses_compile_and_tpp(tmp_path, section, key, method):
    raw = tiny_spec(tmp_path, method, **{section: {key: True}})
    raw["teacher"]["shard"] = True
    with pytest.raises(SpecError) as info:
        load_spec(raw)
    assert info.value.path == f"{section}.{key}" and "teacher.shard" in info.value.message


def test_sharding_one_process_is_refused(tmp_path):
    teacher = frozen_teacher(compile_spec(_spec(tmp_path, shard=True)))
    with pytest.raises(SpecError) as info:
        shard_teacher(teacher, DistInfo(), torch.device("cpu"))
    assert info.value.path == "teacher.shard" and "torchrun" in info.value.message


def test_plan_says_what_the_teacher_runs_in(tmp_path):
    fp32 = compile_spec(_spec(tmp_path), materialize=False)
    bf16 = compile_spec(_spec(tmp_path, dtype="bfloat16", shard=True), materialize=False)
    assert (fp32.plan.teacher_dtype, fp32.plan.teacher_shard) == ("float32", False)
    assert "teacher_dtype" not in fp32.plan.to_dict()  # the default plan's JSON is unchanged
    assert (bf16.plan.to_dict()["teacher_dtype"], bf16.plan.to_dict()["teacher_shard"]) == ("bfloat16", True)
    console = Console(width=300, record=True, file=open("/dev/null", "w"))
    console.print(spec_table(bf16))
    assert "runs in bfloat16, sharded over torchrun's ranks (FSDP2)" in console.export_text()


def test_cache_key_names_the_teacher_dtype(tmp_path):
    fp32, bf16 = (cache_key(_spec(tmp_path, dtype=d), "full", None, 1) for d in ("float32", "bfloat16"))
    diff = differences(fp32, bf16)
    assert len(diff) == 1 and diff[0].startswith("teacher") and "bfloat16" in diff[0]


# -- a half-precision teacher -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_teacher_equals_the_teacher_cast_by_hand(tmp_path, teacher_file, dtype):
    half = HALF[dtype]
    fp32 = frozen_teacher(compile_spec(_spec(tmp_path, teacher_file=teacher_file)))
    teacher = frozen_teacher(compile_spec(_spec(tmp_path, teacher_file=teacher_file, dtype=dtype)))
    ref = _reference(teacher_file)
    x = _batch()
    with torch.no_grad():
        want = ref.to(half)(x.to(half)).float()
    assert all(p.dtype == half for p in teacher.model.parameters())
    got = teacher(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the segments, in order, are the same function; the head's output is its logits
    last = len(teacher.segments)
    torch.testing.assert_close(teacher.features(x, set(range(1, last + 1)))[last], want, rtol=0, atol=0)
    # the check can fail: the float32 teacher's logits differ from the half one's
    assert not torch.equal(fp32(x), got)
    # half the bytes: 2 per parameter, counted on the reference
    n = sum(p.numel() for p in ref.parameters())
    assert (fp32.parameter_bytes(), teacher.parameter_bytes()) == (4 * n, 2 * n)


def test_half_teacher_ignores_the_callers_autocast(tmp_path, teacher_file):
    """Computed in its own dtype: float16 weights under a bfloat16 autocast still run in float16."""
    teacher = frozen_teacher(compile_spec(_spec(tmp_path, teacher_file=teacher_file, dtype="float16")))
    x = _batch()
    with torch.no_grad():
        want = _reference(teacher_file).half()(x.half()).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = teacher(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["kd+mse", "stablekd"])
def test_half_teacher_feeds_float32_features_to_the_step(tmp_path, method):
    """Feature losses and StableKD's teacher-fed student blocks read float32 teacher features."""
    d = Distiller(compile_spec(_spec(tmp_path, method, dtype="bfloat16")))
    x, y = _batch(), torch.arange(8) % 10
    feats = d.teacher.features(x, {1, 2, 3, 4})
    assert all(f.dtype == torch.float32 for f in feats.values())
    terms = d(x, y)
    assert terms and all(torch.isfinite(t).all() for t in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is None for p in d.teacher.model.parameters())


# -- a sharded teacher: two gloo ranks -------------------------------------------------------------

def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = cli_env()
    env["PYTHONPATH"] = str(ROOT / "tests") + ":" + env["PYTHONPATH"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_teacher_equals_the_unsharded_one_on_two_gloo_ranks(tmp_path, dtype):
    res = _torchrun(str(ROOT / "tests" / "_shard_worker.py"), str(tmp_path), dtype)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for run in ranks:
        before, after = run["before"], run["after"]
        assert run["world_size"] == 2
        torch.testing.assert_close(after["logits"], before["logits"], rtol=0, atol=1e-6)
        assert after["logits"].dtype == torch.float32
        for i, feature in before["features"].items():
            torch.testing.assert_close(after["features"][i], feature, rtol=0, atol=1e-6)
        last = max(before["features"])
        torch.testing.assert_close(after["logits_only"][last], before["logits"], rtol=0, atol=1e-6)
        # each rank holds its half of every parameter (uneven ones differ by a row)
        assert 0.45 < after["bytes"] / before["bytes"] < 0.55
    assert sum(r["after"]["bytes"] for r in ranks) == ranks[0]["before"]["bytes"]


@pytest.mark.slow
def test_sharded_training_equals_unsharded_training_under_torchrun(tmp_path):
    """The real loop (`torchrun -m kdgraph train`): DDP on the student, FSDP2 on the teacher,
    the teacher evaluated on every rank; the same student as with the teacher whole on each rank."""
    students, summaries = {}, {}
    for shard in (False, True):
        raw = tiny_spec(tmp_path / f"shard-{shard}", "kd+mse", epochs=1, fraction=0.1,
                        runtime={"bn_recalibrate": False})
        raw["teacher"]["shard"] = shard
        res = _torchrun("-m", "kdgraph", "train", str(write_spec(raw, tmp_path / f"spec-{shard}.yaml")))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert ("the teacher runs in float32, sharded over 2 ranks (FSDP2)" in res.stdout + res.stderr) == shard
        students[shard] = load_file(str(tmp_path / f"shard-{shard}" / "student.safetensors"))
        summaries[shard] = json.loads((tmp_path / f"shard-{shard}" / "summary.json").read_text())
    assert students[True].keys() == students[False].keys()
    for k, v in students[False].items():
        torch.testing.assert_close(students[True][k], v, rtol=1e-5, atol=1e-6)
    assert summaries[True]["teacher_top1"] == summaries[False]["teacher_top1"] is not None

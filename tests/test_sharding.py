"""kdgraph.runtime.sharding: runtime.shard_student (FSDP2 on the student) and its DCP checkpoints.

Independent truths: the same pair trained through the real ``Trainer`` with the student under
DDP (the unsharded reference) on two gloo ranks; the same sharded run uninterrupted for its
resume; one process reading both ranks' windows per step (mean of equal-sized batch means is
the mean of the union) for the resume at one rank; parameter bytes counted from the model's own
tensors, halved by hand; sha256 files edited on disk by the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _runtime_helpers import ROOT, cli_env
from kdgraph.compiler import compile_spec
from kdgraph.errors import KDGraphError, SpecError
from kdgraph.runtime import runs
from kdgraph.runtime.distiller import Distiller
from kdgraph.runtime.loop import Trainer, checkpoint_states
from kdgraph.runtime.runs import RunFolder
from kdgraph.runtime.sharding import (
    ShardedCheckpoints,
    apply_student_options,
    check_shardable,
    repeated_layers,
)
from kdgraph.runtime.techniques import DistInfo
from kdgraph.spec import load_spec
from test_tasks_causal_lm import _kwargs, _raw

TWO = DistInfo(rank=0, world_size=2)  # what torchrun's two ranks look like, for the checks made before any gather


def _lm(tmp_path: Path, student_layers: int = 2, **runtime) -> dict:
    raw = _raw(tmp_path)
    raw["student"]["kwargs"] = _kwargs(32, student_layers)
    raw["teacher"]["kwargs"] = _kwargs(32, 2)
    raw["data"].update({"seq_len": 8, "batch_size": 4})
    raw["runtime"].update(runtime)
    return raw


# -- the spec and the checks ---------------------------------------------------------------------

def test_spec_fields_default_off_and_refuse_what_cannot_run(tmp_path):
    rt = load_spec(_lm(tmp_path)).runtime
    assert (rt.shard_student, rt.shard_dtype, rt.activation_checkpointing) == (False, "float32", False)
    for runtime, at in (({"shard_dtype": "bfloat16"}, "runtime.shard_dtype"),
                        ({"shard_student": True, "compile": True}, "runtime.compile")):
        with pytest.raises(SpecError) as info:
            load_spec(_lm(tmp_path, **runtime))
        assert info.value.path == at
    assert load_spec(_lm(tmp_path, shard_student=True, shard_dtype="bfloat16")).runtime.shard_dtype == "bfloat16"


def test_repeated_layers_are_the_decoder_layers(tmp_path):
    d = Distiller(compile_spec(load_spec(_lm(tmp_path, student_layers=3))))
    assert repeated_layers(d.student) is d.student.lm.model.layers
    assert repeated_layers(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())) is None


def test_one_process_and_a_student_without_repeated_layers_are_refused(tmp_path):
    d = Distiller(compile_spec(load_spec(_lm(tmp_path))))
    with pytest.raises(SpecError) as info:
        check_shardable(d, DistInfo())
    assert info.value.path == "runtime.shard_student" and "torchrun" in info.value.message
    one = Distiller(compile_spec(load_spec(_lm(tmp_path, student_layers=1))))
    with pytest.raises(SpecError) as info:
        check_shardable(one, TWO)
    assert "no repeated layers" in info.value.message
    assert check_shardable(d, TWO) is d.student.lm.model.layers


@pytest.mark.parametrize("option", ["shard_student", "activation_checkpointing"])
def test_a_student_run_as_traced_blocks_is_refused(tmp_path, option):
    """kd+mse on two blocks runs the student's traced segments (its block-1 feature)."""
    raw = _lm(tmp_path, **{option: True})
    raw["decompose"] = {"blocks": 2}
    raw["schedule"]["method"] = "kd+mse"
    trainer_spec = load_spec(raw)
    compiled = compile_spec(trainer_spec)
    d = Distiller(compiled)
    from kdgraph.runtime.config import resolve_config

    config = resolve_config(trainer_spec, torch.device("cpu"), d.student)
    with pytest.raises(SpecError) as info:
        apply_student_options(d, compiled.plan, config, DistInfo())
    assert info.value.path == f"runtime.{option}" and "decompose.blocks: 1" in info.value.message


def test_activation_checkpointing_alone_keeps_the_gradient(tmp_path):
    """Unsharded: the layers recompute their activations; the loss's gradient is the same."""
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        spec = load_spec(_lm(tmp_path, activation_checkpointing=on))
        compiled = compile_spec(spec)
        d = Distiller(compiled)
        from kdgraph.runtime.config import resolve_config

        apply_student_options(d, compiled.plan, resolve_config(spec, torch.device("cpu"), d.student), DistInfo())
        x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
        sum(d(x, x).values()).backward()
        grads.append({n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=0, atol=0)


# -- DCP checkpoints in one process --------------------------------------------------------------

def _trainer(tmp_path: Path, batch_size: int = 4, **optim) -> tuple[Trainer, ShardedCheckpoints]:
    raw = _lm(tmp_path)
    raw["data"]["batch_size"] = batch_size
    raw["optim"].update(optim)
    spec = load_spec(raw)
    trainer = Trainer.from_spec(spec)
    manager = ShardedCheckpoints(trainer.folder, checkpoint_states(trainer, spec.to_dict()), lambda: "resume", DistInfo())
    return trainer, manager


def _step(trainer: Trainer, g: int) -> float:
    xb, yb, _ = next(iter(trainer.batches(0, g)))
    trainer.distiller.train()
    return float(trainer.train_step(xb, yb)[1])


def test_a_dcp_checkpoint_resumes_exactly_in_one_process(tmp_path):
    trainer, manager = _trainer(tmp_path)
    for g in range(3):
        _step(trainer, g)
    trainer.global_step, trainer.saving_at = 3, (0, 3)
    manager.save()
    assert sorted(p.name for p in trainer.folder.sharded_checkpoint.iterdir()) == [".metadata", "__0_0.distcp",
                                                                                   "state.pt"]
    want = [_step(trainer, g) for g in range(3, 6)]
    again, again_manager = _trainer(tmp_path)
    again_manager.restore(True)
    assert (again.global_step, again.position["step"]) == (3, 3)
    assert [_step(again, g) for g in range(3, 6)] == want
    for (n, p), q in zip(trainer.distiller.named_parameters(), again.distiller.parameters()):
        assert torch.equal(p, q), n


def test_a_single_file_checkpoint_loads_into_the_dcp_manager_exactly(tmp_path):
    """An unsharded run's last.pt (CheckpointManager), no DCP folder: the DCP manager reads it
    whole and sets its model and optimizer states through DCP's full-state-dict path (the
    optimizer's numbered parameters renamed); the next steps are the ones the run itself takes."""
    trainer, _ = _trainer(tmp_path)
    for g in range(3):
        _step(trainer, g)
    trainer.global_step, trainer.saving_at = 3, (0, 3)
    trainer.checkpoints.save()
    trainer.checkpoints.written()
    want = [_step(trainer, g) for g in range(3, 6)]
    again, manager = _trainer(tmp_path)
    manager.restore(True)
    assert (again.global_step, again.position["step"]) == (3, 3)
    assert not again.folder.sharded_checkpoint.exists()
    assert [_step(again, g) for g in range(3, 6)] == want
    for (n, p), q in zip(trainer.distiller.named_parameters(), again.distiller.parameters()):
        assert torch.equal(p, q), n


def test_named_optimizer_state_renames_the_numbered_parameters_and_refuses_other_groups(tmp_path):
    from kdgraph.runtime.sharding import named_optimizer_state

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.AdamW([{"params": [model[0].weight, model[1].bias]},
                             {"params": [model[0].bias, model[1].weight], "weight_decay": 0.0}])
    sum(model(torch.ones(1, 2))).sum().backward()
    opt.step()
    saved = opt.state_dict()
    named = named_optimizer_state(model, opt, saved)
    assert [g["params"] for g in named["param_groups"]] == [["0.weight", "1.bias"], ["0.bias", "1.weight"]]
    assert named["param_groups"][1]["weight_decay"] == 0.0
    by_name = dict(model.named_parameters())
    for name, st in named["state"].items():  # each moment is its parameter's (the gradient is 1 for a bias)
        assert st["exp_avg"].shape == by_name[name].shape
    torch.testing.assert_close(named["state"]["1.bias"]["exp_avg"], 0.1 * by_name["1.bias"].grad)
    other = torch.optim.AdamW(model.parameters())
    with pytest.raises(KDGraphError, match=r"groups of \[2, 2\] parameters, this run's \[4\]"):
        named_optimizer_state(model, other, saved)


def test_a_whole_state_that_does_not_fit_the_model_is_a_one_line_error():
    """DCP's full-state-dict load keeps the model's own tensor for a key the file lacks: the
    keys are compared first; a tensor of another shape is torch's error, made one line."""
    from kdgraph.runtime.sharding import load_full_tensors

    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    whole = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(KDGraphError, match=r"missing \['0.bias'\], unexpected none"):
        load_full_tensors(model, opt, {"model": {"0.weight": whole["0.weight"]}, "optimizer": opt.state_dict()})
    with pytest.raises(KDGraphError) as info:
        load_full_tensors(model, opt, {"model": {**whole, "0.bias": torch.zeros(4)}, "optimizer": opt.state_dict()})
    assert "does not load into this run's sharded one" in str(info.value) and "\n" not in str(info.value)
    assert torch.equal(model[0].bias, whole["0.bias"])


def test_a_damaged_shard_falls_back_to_the_previous_and_both_damaged_is_an_error(tmp_path):
    trainer, manager = _trainer(tmp_path)
    manager.save()
    _step(trainer, 0)
    manager.save()
    folder = trainer.folder
    assert folder.previous_sharded_checkpoint.is_dir() and not folder.sharded_checkpoint_temp.exists()
    shard = folder.sharded_checkpoint / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    fresh, fresh_manager = _trainer(tmp_path)
    before = [p.clone() for p in fresh.distiller.parameters()]
    _, warning = fresh_manager.restore(True)
    assert "__0_0.distcp" in warning and "prev.dcp" in warning
    # the previous checkpoint is the state before the step: the initial weights
    assert all(torch.equal(p, q) for p, q in zip(before, fresh.distiller.parameters()))
    (folder.previous_sharded_checkpoint / ".metadata").unlink()
    with pytest.raises(KDGraphError, match="previous checkpoint is no good either"):
        _trainer(tmp_path)[1].restore(True)


def test_a_checkpoint_of_another_spec_is_refused_before_any_weight_loads(tmp_path):
    trainer, manager = _trainer(tmp_path)
    _step(trainer, 0)
    manager.save()
    other, other_manager = _trainer(tmp_path, lr=0.02)
    before = [p.clone() for p in other.distiller.parameters()]
    with pytest.raises(KDGraphError, match="another spec.*optim.lr"):
        other_manager.restore(True)
    assert all(torch.equal(p, q) for p, q in zip(before, other.distiller.parameters()))


def test_a_checkpoint_of_other_training_data_is_refused_before_any_weight_loads(tmp_path):
    """The same spec over a text file that changed: the data record (token file, windows) differs."""
    trainer, manager = _trainer(tmp_path)
    _step(trainer, 0)
    manager.save()
    text = tmp_path / "text" / "dickens.txt"
    text.write_text(text.read_text() + " It was the spring of hope.")
    other, other_manager = _trainer(tmp_path)
    before = [p.clone() for p in other.distiller.parameters()]
    with pytest.raises(KDGraphError, match="other training data"):
        other_manager.restore(True)
    assert all(torch.equal(p, q) for p, q in zip(before, other.distiller.parameters()))


def test_the_run_folder_knows_the_dcp_folders(tmp_path):
    resolved = load_spec(_lm(tmp_path)).to_dict()
    runs.claim(runs.prepare_output(Path(resolved["output"])), resolved, resume=False, force=False)
    trainer, manager = _trainer(tmp_path)
    manager.save()
    manager.save()
    folder = RunFolder(trainer.folder.root)
    folder.metrics.write_text("")
    assert {"checkpoints/last.dcp", "checkpoints/prev.dcp"} <= set(folder.earlier_run())
    runs.claim(folder.root, resolved, resume=False, force=True)
    assert not folder.checkpoints.exists()  # --force removed the shard folders kdgraph wrote, then checkpoints/


def test_a_foreign_file_in_a_dcp_folder_is_never_deleted(tmp_path):
    trainer, manager = _trainer(tmp_path)
    manager.save()
    mine = trainer.folder.sharded_checkpoint / "notes.txt"
    mine.write_text("mine")
    manager.save()  # last.dcp (with notes.txt) becomes prev.dcp
    with pytest.raises(KDGraphError, match="holds files kdgraph did not write"):
        manager.save()  # prev.dcp would be removed: refused
    prev = trainer.folder.previous_sharded_checkpoint
    assert (prev / "notes.txt").read_text() == "mine" and (prev / "state.pt").is_file()  # nothing of it went


# -- two gloo ranks ------------------------------------------------------------------------------

def _worker(out: Path, raw: dict, *extra: str, torchrun: bool = True) -> None:
    env = cli_env()
    env["PYTHONPATH"] = str(ROOT / "tests") + ":" + env["PYTHONPATH"]
    env["OMP_NUM_THREADS"] = "1"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    res = subprocess.run([*launch, str(ROOT / "tests" / "_lm_shard_worker.py"), str(out), json.dumps(raw), *extra],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_ranks_sharded_student_equals_ddp_resumes_exactly_and_loads_at_one_rank(tmp_path):
    raw = _lm(tmp_path)
    _worker(tmp_path, raw)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    whole = ranks[0]["ddp"]["bytes"]
    for run in ranks:
        assert run["world_size"] == 2
        ddp, sharded = [x[0] for x in run["ddp"]["losses"]], [x[0] for x in run["sharded"]["losses"]]
        assert len(sharded) == 20 and sharded[-1] < sharded[0]
        torch.testing.assert_close(torch.tensor(sharded), torch.tensor(ddp), rtol=1e-5, atol=1e-6)
        # resumed from the step-10 DCP checkpoint by a new Trainer: the same steps 11..20, bit for bit
        assert [x[0] for x in run["resumed"]["losses"]] == sharded[10:]
        # activation checkpointing recomputes the same activations
        torch.testing.assert_close(torch.tensor([x[0] for x in run["ckpt"]["losses"]]), torch.tensor(sharded),
                                   rtol=1e-6, atol=1e-7)
        # each rank holds about half of the student's and the teacher's parameter bytes
        for who in ("student", "teacher"):
            assert run["ddp"]["bytes"][who] == whole[who]
            assert 0.45 < run["sharded"]["bytes"][who] / whole[who] < 0.55
    for who in ("student", "teacher"):
        assert sum(r["sharded"]["bytes"][who] for r in ranks) == whole[who]
    # one process, the student whole, batches of both ranks' windows, from the two-rank checkpoint
    _worker(tmp_path, raw, "one", torchrun=False)
    one = torch.load(tmp_path / "one.pt")
    assert one["from"] == 10
    mean = [x[1] for x in ranks[0]["sharded"]["losses"]][10:]
    torch.testing.assert_close(torch.tensor([x[0] for x in one["losses"]]), torch.tensor(mean), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torchrun_train_with_a_sharded_student_exports_the_ddp_students_weights(tmp_path):
    """The real loop (`torchrun -m kdgraph train`): evaluation, samples and export on every rank
    of a sharded student; the student file (gathered on rank 0) equals the DDP run's, and
    `kdgraph export` ships it as a transformers folder whose logits are that student's."""
    from safetensors.torch import load_file

    from _runtime_helpers import write_spec
    from kdgraph.runtime.commands import export_spec

    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    students, logs = {}, {}
    for shard in (False, True):
        raw = _lm(tmp_path, shard_student=shard)
        raw["output"] = str(tmp_path / f"shard-{shard}")
        raw["schedule"]["epochs"] = 1
        raw["teacher"]["shard"] = shard
        spec_file = write_spec(raw, tmp_path / f"spec-{shard}.yaml")
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "kdgraph", "train", str(spec_file)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        logs[shard] = res.stdout + res.stderr
        students[shard] = load_file(str(tmp_path / f"shard-{shard}" / "student.safetensors"))
    assert "the student is sharded over 2 ranks (FSDP2" in logs[True]
    assert logs[True].count("bits per byte, teacher") == 1  # rank 0 alone prints the headline
    folder = RunFolder(tmp_path / "shard-True")
    assert (folder.sharded_checkpoint / "state.pt").is_file() and not folder.last_checkpoint.exists()
    assert folder.text_samples.is_file() and folder.best.is_file()
    assert students[True].keys() == students[False].keys()
    for k, v in students[False].items():
        torch.testing.assert_close(students[True][k], v, rtol=1e-5, atol=1e-6)
    raw = _lm(tmp_path, shard_student=True)
    raw["schedule"]["epochs"], raw["teacher"]["shard"], raw["output"] = 1, True, str(folder.root)
    spec = load_spec(raw)
    assert export_spec(spec, tmp_path / "hf")["format"] == "transformers"
    import transformers

    lm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    student = compile_spec(spec).student.model.eval()
    student.load_state_dict(students[True])
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, student(ids))


# -- --reshard: a checkpoint of another world size ---------------------------------------------------

def test_resharded_data_keeps_the_windows_of_each_step_and_names_the_batch_size_that_does():
    stored = {"loader": "text", "epoch": 1, "step": 0, "seed": 0, "num_samples": 200, "batch_size": 4,
              "world_size": 2, "tokens": "t"}
    now = {**stored, "world_size": 1, "batch_size": 8}
    assert runs.resharded_data(stored, now) == now  # 4 x 2 = 8 x 1 windows per step: accepted as this run's
    with pytest.raises(KDGraphError, match=r"read 8 per step .*this run reads 4 .*set data.batch_size=8"):
        runs.resharded_data(stored, {**now, "batch_size": 4})
    with pytest.raises(KDGraphError, match="number of ranks that divides 8"):
        runs.resharded_data(stored, {**now, "batch_size": 3, "world_size": 3})


def test_laid_out_plans_differ_only_in_whether_the_teacher_is_sharded():
    from kdgraph.runtime.loop import laid_out

    whole, sharded = {"method": "kd"}, {"method": "kd", "teacher_dtype": "float32", "teacher_shard": True}
    assert laid_out(whole, True) == laid_out(sharded, True) and laid_out(whole, False) != laid_out(sharded, False)
    half = {"method": "kd", "teacher_dtype": "bfloat16", "teacher_shard": True}
    assert laid_out(half, True) != laid_out(sharded, True)  # the teacher's dtype is what it computes in: kept


@pytest.mark.parametrize("fmt", ["dcp", "pt", "pt>dcp"])
def test_reshard_accepts_another_world_size_and_refuses_everything_else(tmp_path, fmt):
    """A one-process checkpoint (DCP folder, or a whole student's last.pt) whose data record
    says 2 ranks of 4 windows, as a two-rank run's does: resumed with --reshard at 1 rank of 8
    windows, refused without it, and refused with it where the windows per step, or anything
    trained, differ. A new trainer finds the run's checkpoint format on disk; ``pt>dcp``: the
    last.pt read by the DCP manager, as a run that shards the student reads it."""
    trainer, manager = _trainer(tmp_path)
    manager = manager if fmt == "dcp" else trainer.checkpoints
    _step(trainer, 0)
    trainer.data.train.world_size = 2  # the data record of a two-rank run of data.batch_size 4
    trainer.saving_at, trainer.global_step = (0, 1), 1
    manager.save()
    manager.written()

    def resumed(reshard: bool, **optim):
        other, dcp_manager = _trainer(tmp_path, batch_size=8, **optim)
        assert isinstance(other.checkpoints, ShardedCheckpoints) == (fmt == "dcp")
        other.checkpoints = dcp_manager if fmt == "pt>dcp" else other.checkpoints
        other.reshard = reshard
        before = [p.clone() for p in other.distiller.parameters()]
        try:
            other.checkpoints.restore(True)
        except KDGraphError as exc:
            if fmt != "pt" or "another spec" in str(exc):  # CheckpointManager reads the data record after the weights
                assert all(torch.equal(p, q) for p, q in zip(before, other.distiller.parameters()))
            raise
        return other

    with pytest.raises(KDGraphError, match=r"another spec \(differs: .*data.batch_size: 4 -> 8"):
        resumed(False)
    again = resumed(True)
    assert again.global_step == 1 and "the checkpoint of 2 rank(s) continues on 1" in again.reshard_note
    assert again.reshard_note.endswith("reads the same 8 windows as before, in the same order")  # no caveat: no BatchNorm
    for p, q in zip(trainer.distiller.parameters(), again.distiller.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(KDGraphError, match="another spec.*optim.lr"):
        resumed(True, lr=0.02)
    trainer.data.train.batch_size = 2  # 2 x 2 windows per step then, 8 x 1 now
    manager.save()
    manager.written()
    with pytest.raises(KDGraphError, match="set data.batch_size=4"):
        resumed(True)


@pytest.mark.parametrize("mixup", [False, True])
def test_reshard_of_an_image_run_says_what_each_rank_computes_over_its_own_batch(tmp_path, mixup):
    """A classification run (the tiny ResNets: BatchNorm in the student) checkpointed as two
    ranks of 16 images: resumed at one rank of 32 with --reshard, it loads, and its note says
    that BatchNorm (and, with it, data.mixup) now sees 32 images per rank where it saw 16."""
    from _runtime_helpers import tiny_spec

    def trainer_of(batch_size: int) -> Trainer:
        raw = tiny_spec(tmp_path / "run", "kd+mse", epochs=1, fraction=0.1, batch_size=batch_size,
                        data={"dataset": "digits", "batch_size": batch_size, "fraction": 0.1,
                              **({"mixup": {}} if mixup else {})})
        return Trainer.from_spec(load_spec(raw))

    trainer = trainer_of(16)
    trainer.data.train.world_size = 2  # the data record of a two-rank run of data.batch_size 16
    trainer.saving_at, trainer.global_step = (0, 1), 1
    trainer.checkpoints.save()
    trainer.checkpoints.written()
    other = trainer_of(32)
    other.reshard = True
    other.checkpoints.restore(True)
    note = other.reshard_note
    assert other.global_step == 1 and "data.batch_size 16 -> 32: each optimizer step reads the same 32 samples" in note
    assert "the student's BatchNorm layers normalise over each rank's 32 samples (16 before)" in note
    assert ("data.mixup mixes pairs within each rank's batch" in note) == mixup
    assert "\n" not in note and note.endswith("not step for step as, the uninterrupted one")
    for p, q in zip(trainer.distiller.state_dict().values(), other.distiller.state_dict().values()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("n, augment", [(11, "crop+flip"), (12, "crop+flip"), (11, "none"), (11, "crop")])
def test_reshard_names_the_augmentation_draws_exactly_where_the_loader_draws_other_ones(n, augment):
    """The in-memory loader's step s at 2 ranks of 2 against 1 rank of 4: the same samples
    always, the same crops and flips where n splits evenly or no flip is drawn; the note's
    caveat is there exactly where the loader's images differ."""
    from types import SimpleNamespace

    from kdgraph.data import DeviceLoader
    from kdgraph.runtime.loop import per_rank_caveat

    x, y = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(n)

    def steps(world_size: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loaders = [DeviceLoader(x, y, batch_size, shuffle=True, augment=augment, seed=0, drop_last=True, rank=r,
                                world_size=world_size) for r in range(world_size)]
        out = []
        for batches in zip(*(loader.epoch(0) for loader in loaders)):
            xb, yb = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            out.append((xb[yb.argsort()], yb.sort().values))
        return out

    two, one = steps(2, 2), steps(1, 4)
    assert len(two) == len(one) and all(torch.equal(a[1], b[1]) for a, b in zip(two, one))
    same_images = all(torch.equal(a[0], b[0]) for a, b in zip(two, one))
    loader = DeviceLoader(x, y, 4, shuffle=True, augment=augment, seed=0, drop_last=True)
    run = SimpleNamespace(distiller=SimpleNamespace(student=torch.nn.Linear(2, 2)),
                          config=SimpleNamespace(mixup=None), data=SimpleNamespace(train=loader))
    caveat = per_rank_caveat(run, loader.state_dict(0, 0) | {"world_size": 2, "batch_size": 2},
                             loader.state_dict(0, 0))
    assert (caveat == "") == same_images
    assert same_images == (n % 2 == 0 or augment != "crop+flip")  # crops alone: the same first offsets drawn
    if caveat:
        assert f"flips are drawn anew ({n} samples split unevenly over 2 or 1 ranks)" in caveat


def test_reshard_needs_resume(tmp_path):
    from kdgraph.runtime.loop import train

    with pytest.raises(KDGraphError, match="--reshard .* use it with --resume"):
        train(load_spec(_lm(tmp_path)), reshard=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_sharded_run_resumes_at_one_rank_with_reshard(tmp_path):
    """`torchrun --nproc_per_node 2 -m kdgraph train` (student and teacher sharded, 2 epochs),
    its last checkpoint damaged and its summary gone (a run killed in its second epoch), then
    `kdgraph train --resume --reshard` in one process from the end-of-epoch-1 DCP checkpoint,
    the student whole and data.batch_size doubled: it trains epoch 2 on the same windows and
    ends with the two-rank run's student (within float tolerance)."""
    from safetensors.torch import load_file

    from _runtime_helpers import run_cli, write_spec
    from kdgraph.runtime.sharding import read_folder

    raw = _lm(tmp_path, shard_student=True)
    raw["teacher"]["shard"] = True
    spec_file = write_spec(raw, tmp_path / "spec.yaml")
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "kdgraph", "train", str(spec_file)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    folder = RunFolder(Path(raw["output"]))
    want = load_file(str(folder.student))
    position = read_folder(folder.previous_sharded_checkpoint)["position"]
    assert (position["epoch"], position["step"]) == (1, 0) and position["global_step"] > 0  # the end of epoch 1
    shard = folder.sharded_checkpoint / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    folder.summary.unlink()
    one = ["--set", "runtime.shard_student=false", "--set", "teacher.shard=false", "--set", "data.batch_size=8"]
    refused = run_cli("train", str(spec_file), "--resume", *one)  # without --reshard: another spec
    assert refused.returncode == 2 and "runtime.shard_student" in refused.stderr
    res = run_cli("train", str(spec_file), "--resume", "--reshard", "--quiet", *one, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = res.stdout + res.stderr
    assert "continuing from the previous checkpoint" in text
    assert "--reshard: the checkpoint of 2 rank(s) continues on 1, data.batch_size 4 -> 8" in text.replace("\n", " ")
    got = load_file(str(folder.student))
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5)
    # it keeps writing DCP checkpoints, now of one rank
    assert sorted(p.name for p in folder.sharded_checkpoint.iterdir()) == [".metadata", "__0_0.distcp", "state.pt"]


def _one_process_then_two_ranks(raw: dict, tmp_path: Path, overrides: list[str]) -> tuple[RunFolder, dict, str]:
    """`kdgraph train` of ``raw`` in one process, its last checkpoint damaged and its summary gone
    (a run killed in its last epoch), then `torchrun --nproc_per_node 2 -m kdgraph train --resume
    --reshard` with ``overrides`` (``--set`` pairs): the run folder, the one-process run's student
    and the two ranks' output on one line."""
    from safetensors.torch import load_file

    from _runtime_helpers import run_cli, write_spec

    spec_file = write_spec(raw, tmp_path / "spec.yaml")
    res = run_cli("train", str(spec_file), "--quiet", timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    folder = RunFolder(Path(raw["output"]))
    want = load_file(str(folder.student))
    last = bytearray(folder.last_checkpoint.read_bytes())
    last[len(last) // 2] ^= 0xFF
    folder.last_checkpoint.write_bytes(bytes(last))
    folder.summary.unlink()
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "kdgraph", "train", str(spec_file), "--resume", "--reshard", *overrides], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return folder, want, (res.stdout + res.stderr).replace("\n", " ")


@pytest.mark.slow
def test_a_whole_students_last_pt_resumes_on_two_sharded_ranks_with_reshard(tmp_path):
    """The other way: `kdgraph train` in one process (the student whole, DDP-less, last.pt
    checkpoints, data.batch_size 8, 2 epochs), its last checkpoint damaged and its summary gone
    (a run killed in its second epoch), then `torchrun --nproc_per_node 2 -m kdgraph train
    --resume --reshard` with the student and the teacher sharded and data.batch_size 4: the two
    ranks read the end-of-epoch-1 prev.pt whole, scatter it into their shards, train epoch 2 on
    the same windows and end with the one-process run's student (within float tolerance)."""
    from safetensors.torch import load_file

    raw = _lm(tmp_path)
    raw["data"]["batch_size"] = 8
    folder, want, text = _one_process_then_two_ranks(
        raw, tmp_path, ["--set", "runtime.shard_student=true", "--set", "teacher.shard=true", "--set", "data.batch_size=4"])
    assert "continuing from the previous checkpoint" in text and "prev.pt" in text
    assert "--reshard: the checkpoint of 1 rank(s) continues on 2, data.batch_size 8 -> 4" in text
    assert "the student is sharded over 2 ranks (FSDP2" in text
    got = load_file(str(folder.student))
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5)
    # it goes on in DCP's format, each rank its shards; the files of the one-process run stay
    assert sorted(p.name for p in folder.sharded_checkpoint.iterdir()) == [".metadata", "__0_0.distcp",
                                                                           "__1_0.distcp", "state.pt"]
    assert folder.previous_checkpoint.is_file()


@pytest.mark.slow
def test_an_image_run_resumes_on_two_ddp_ranks_with_a_sharded_teacher_with_reshard(tmp_path):
    """An image task under --reshard: the toy DDPM pair (GroupNorm U-Nets: nothing in the step
    depends on how a step's images are split over ranks; the noise is drawn per image index)
    trained 2 epochs in one process with data.batch_size 8, its last checkpoint damaged, then
    resumed by two torchrun ranks (the student under DDP, the teacher sharded, batch 4) from the
    end of epoch 1: it ends with the one-process run's student (within float tolerance). SGD:
    AdamW divides by the root of tiny second moments (the time-embedding projections'), which
    turns float-reduction-order noise into 1e-3 differences, DDP against one process alike."""
    from safetensors.torch import load_file

    from kdgraph.runtime.checkpoint import load
    from test_diffusion import _spec as denoise_spec

    raw = denoise_spec(tmp_path)
    raw["runtime"].pop("checkpoint_every")  # a checkpoint at each epoch's end: prev.pt is epoch 1's
    raw["optim"] = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
    folder, want, text = _one_process_then_two_ranks(
        raw, tmp_path, ["--set", "teacher.shard=true", "--set", "data.batch_size=4"])
    assert "--reshard: the checkpoint of 1 rank(s) continues on 2, data.batch_size 8 -> 4" in text
    assert "sharded over 2 ranks (FSDP2)" in text and "BatchNorm" not in text
    got = load_file(str(folder.student))
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    epoch1 = load(folder.previous_checkpoint)["model"]  # epoch 2 moved the student further than that
    assert max((epoch1[f"student.{k}"] - v).abs().max().item() for k, v in want.items()) > 1e-3

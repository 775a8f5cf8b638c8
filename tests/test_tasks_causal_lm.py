"""kdgraph.tasks.causal_lm: a tiny byte-level Llama pair (teacher 2 layers, student 1, width 32,
vocabulary 256) distilled on a text folder the test writes, through the real runtime.

Independent truths: the held-out metrics recomputed by hand from the trained student's
weights loaded into a plain transformers model, on windows cut here from the file's bytes
(the last 5 % held out, windows of seq_len + 1 bytes stepping by seq_len); the training order
written out from numpy's generator seeded by (seed, epoch); an uninterrupted run for the
resumed one; plain transformers, in a process without kdgraph, for the export.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from _runtime_helpers import popen_cli, run_cli, train_here, write_spec
from kdgraph.errors import DataError
from kdgraph.spec import load_spec

SEQ = 16
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 12


def _kwargs(width: int, layers: int) -> dict:
    return {"vocab_size": 256, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _raw(tmp_path: Path, name: str = "run", teacher: bool = True, **sections) -> dict:
    root = tmp_path / "text"
    if not root.exists():
        root.mkdir()
        (root / "dickens.txt").write_text(TEXT, encoding="utf-8")
    raw = {"name": "tiny-lm", "seed": 0, "output": str(tmp_path / name),
           "student": {"model": "transformers:llama", "kwargs": _kwargs(32, 1)},
           "data": {"dataset": "text", "root": str(root), "seq_len": SEQ, "batch_size": 8},
           "decompose": {"blocks": 1}, "schedule": {"method": "kd" if teacher else "supervised", "epochs": 2},
           "optim": {"name": "adamw", "lr": 0.01, "lr_schedule": "constant"},
           "runtime": {"device": "cpu", "log_every": 1, "num_threads": 1}}
    if teacher:
        raw["teacher"] = {"model": "transformers:llama", "kwargs": _kwargs(32, 2)}
        raw["loss"] = {"ce_weight": 0.5}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def _steps(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return [r for r in recs if r["kind"] == "step"]


def _heldout_by_hand(text: str) -> np.ndarray:
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    held = data[len(data) - int(len(data) * 0.05):]
    n = (len(held) - 1) // SEQ
    return np.stack([held[i * SEQ:i * SEQ + SEQ + 1] for i in range(n)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    spec = load_spec(_raw(tmp))
    return spec, train_here(spec), tmp


def test_a_tiny_pair_trains_and_its_loss_goes_down(trained):
    spec, summary, tmp = trained
    assert summary["task"] == "causal_lm" and summary["student_top1"] is None
    steps = _steps(tmp / "run")
    assert {"ce", "fkl"} <= set(steps[0])
    first, last = steps[:5], steps[-5:]
    assert sum(r["ce"] for r in last) < 0.7 * sum(r["ce"] for r in first)
    epochs = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs[-1]["student_bpb"] < epochs[0]["student_bpb"] < 8.0  # below a uniform guess: log2(256)
    best = min(epochs, key=lambda r: r["student_bpb"])
    assert (summary["best_bpb"], summary["best_epoch"]) == (best["student_bpb"], best["epoch"] + 1)


def test_heldout_metrics_equal_the_student_scored_by_hand(trained):
    spec, summary, tmp = trained
    import transformers

    config = transformers.LlamaConfig(**_kwargs(32, 1))
    lm = transformers.LlamaForCausalLM(config).eval()
    state = load_file(str(tmp / "run" / "student.safetensors"))
    lm.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()})
    windows = torch.from_numpy(_heldout_by_hand(TEXT))
    with torch.no_grad():
        logits = lm(input_ids=windows[:, :-1]).logits
    nats = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].reshape(-1), reduction="sum").item()
    tokens = windows[:, 1:].numel()  # one byte per token
    assert summary["student_loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert summary["student_ppl"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)
    assert summary["student_bpb"] == pytest.approx(nats / math.log(2) / tokens, rel=1e-5)
    assert summary["teacher_bpb"] is not None and summary["teacher_bpb"] > 0
    from kdgraph.runtime.commands import evaluate_spec

    evaluated = evaluate_spec(spec)  # `kdgraph eval`: the held-out split, the run's student and teacher
    assert evaluated["student_bpb"] == pytest.approx(nats / math.log(2) / tokens, rel=1e-5)
    assert evaluated["samples"] == len(windows) and "teacher_bpb" not in evaluated  # an untrained teacher
    samples = (tmp / "run" / "samples.txt").read_text(encoding="utf-8")
    assert "student continues" in samples and "teacher continues" in samples
    assert TEXT.encode()[len(TEXT.encode()) - int(len(TEXT.encode()) * 0.05):][:SEQ // 2].decode() in samples


def _bpb_by_hand(lm, windows: np.ndarray) -> float:
    w = torch.from_numpy(windows)
    with torch.no_grad():
        logits = lm(input_ids=w[:, :-1]).logits
    nats = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].reshape(-1), reduction="sum").item()
    return nats / math.log(2) / w[:, 1:].numel()


def test_a_validation_split_is_evaluated_during_training_and_the_held_out_text_once(tmp_path):
    """data.val_fraction: the validation windows (the stretch before the held-out end, cut here
    by hand) choose the best epoch; the held-out ones are scored once, at the end."""
    import transformers

    spec = load_spec(_raw(tmp_path, teacher=False, data={"val_fraction": 0.2}))
    summary = train_here(spec)
    assert summary["eval_split"] == "val" and summary["data"]["val_fraction"] == 0.2
    data = np.frombuffer(TEXT.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    cut = len(data) - int(len(data) * 0.05)
    vcut = cut - int(cut * 0.2)
    val = data[vcut:cut]
    val_windows = np.stack([val[i * SEQ:i * SEQ + SEQ + 1] for i in range((len(val) - 1) // SEQ)])
    assert summary["data"]["val_windows"] == len(val_windows)
    assert summary["data"]["train_windows"] == (vcut - 1) // SEQ
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_kwargs(32, 1))).eval()
    state = load_file(str(tmp_path / "run" / "student.safetensors"))
    lm.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()})
    assert summary["student_val_bpb"] == pytest.approx(_bpb_by_hand(lm, val_windows), rel=1e-5)
    assert summary["student_bpb"] == pytest.approx(_bpb_by_hand(lm, _heldout_by_hand(TEXT)), rel=1e-5)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs[-1]["student_bpb"] == pytest.approx(summary["student_val_bpb"])  # epochs read validation
    assert summary["best_bpb"] == min(r["student_bpb"] for r in epochs)


def test_eval_writes_nothing_under_the_output_and_reads_the_runs_token_file(trained, tmp_path):
    from kdgraph.runtime.commands import evaluate_spec

    spec, summary, tmp = trained
    elsewhere = spec.model_copy(update={"output": str(tmp_path / "never-made")})
    assert str(elsewhere.output_dir) == str(tmp_path / "never-made")
    got = evaluate_spec(elsewhere, checkpoint=tmp / "run" / "student.safetensors")
    assert got["student_bpb"] == pytest.approx(summary["student_bpb"], rel=1e-5)
    assert not (tmp_path / "never-made").exists()
    tokens = {p: p.stat().st_mtime_ns for p in (tmp / "run" / "tokens").iterdir()}
    assert len(tokens) == 1
    assert evaluate_spec(spec)["student_bpb"] == pytest.approx(summary["student_bpb"], rel=1e-5)
    assert {p: p.stat().st_mtime_ns for p in (tmp / "run" / "tokens").iterdir()} == tokens  # read, not written


def test_training_windows_are_drawn_from_seed_and_epoch(trained, tmp_path):
    from kdgraph.compiler import compile_spec
    from kdgraph.runtime.techniques import DistInfo
    from kdgraph.tasks.create import create_task

    spec = load_spec(_raw(tmp_path))
    task = create_task(spec, compile_spec(spec))
    data = task.build_data(spec, None, torch.device("cpu"), DistInfo())
    tokens = np.frombuffer(TEXT.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    train = tokens[:len(tokens) - int(len(tokens) * 0.05)]
    n = (len(train) - 1) // SEQ
    for epoch in (0, 1):
        order = np.random.default_rng([spec.seed, epoch]).permutation(n)
        batches = list(data.train.epoch(epoch, start_step=1))
        assert len(batches) == n // 8 - 1
        x, y = batches[0]
        for row, i in enumerate(order[8:16]):
            assert x[row].tolist() == train[i * SEQ:i * SEQ + SEQ].tolist()
            assert y[row].tolist() == train[i * SEQ + 1:i * SEQ + SEQ + 1].tolist()


@pytest.mark.parametrize("field, then", [("tokens", "0-0.tokens"), ("num_samples", 3), ("seed", 7),
                                         ("batch_size", 4), ("world_size", 2), ("loader", "memory")])
def test_resume_refuses_other_training_data(field, then, tmp_path):
    from kdgraph.compiler import compile_spec
    from kdgraph.runtime.techniques import DistInfo
    from kdgraph.tasks.create import create_task

    spec = load_spec(_raw(tmp_path))
    data = create_task(spec, compile_spec(spec)).build_data(spec, None, torch.device("cpu"), DistInfo())
    state = data.state_dict(0, 3)
    data.check_resume(state, "last.pt")  # the same data: accepted
    with pytest.raises(DataError, match=f"other training data.*{field}"):
        data.check_resume({**state, field: then}, "last.pt")


def test_the_plan_shows_the_task_and_the_chosen_divergence(tmp_path):
    from kdgraph.compiler import compile_spec

    def head(raw):
        c = compile_spec(load_spec(raw), materialize=False)
        entry = next(d for _, d in c.graph.nodes(data=True) if d.get("loss") == "head")
        return c, entry

    c, entry = head(_raw(tmp_path))
    assert c.task == "causal_lm" and c.to_dict()["task"] == "causal_lm" and entry["entry"] == "forward_kl"
    _, entry = head(_raw(tmp_path, loss={"token": "jsd", "jsd_beta": 0.3}))
    assert entry["entry"] == "jsd" and entry["params"]["coefficient"] == 0.3
    _, entry = head(_raw(tmp_path, loss={"token": "skew_kl", "skew_alpha": 0.2}))
    assert entry["entry"] == "skew_kl" and entry["params"]["coefficient"] == 0.2
    _, entry = head(_raw(tmp_path, teacher=False))
    assert entry["entry"] == "token_ce"
    res = run_cli("plan", str(write_spec(_raw(tmp_path), tmp_path / "lm.yaml")))
    assert res.returncode == 0, res.stderr
    assert "causal_lm" in res.stdout and "fkl" in res.stdout


def test_missing_text_is_a_clear_error(tmp_path):
    raw = _raw(tmp_path)
    raw["data"]["root"] = str(tmp_path / "nowhere")
    res = run_cli("train", str(write_spec(raw, tmp_path / "lm.yaml")), "--quiet")
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_token_ce_is_the_mean_next_token_nll():
    from kdgraph.losses import LOSSES

    torch.manual_seed(0)
    z, y = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    y[0, 1] = -100
    log_q = z.log_softmax(-1)
    keep = [(b, t) for b in range(2) for t in range(5) if y[b, t] != -100]
    by_hand = -sum(log_q[b, t, y[b, t]] for b, t in keep) / len(keep)
    torch.testing.assert_close(LOSSES.get("token_ce")()(z, y), by_hand)


def _losses(out: Path) -> list[dict]:
    keep = ("epoch", "step", "global_step", "lr", "loss", "ce", "fkl")
    return [{k: r[k] for k in keep if k in r} for r in _steps(out)]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_exactly(tmp_path):
    # ~8x the shared text: an epoch of ~120 steps, so the kill at step >= 7 lands far from its end
    # even when a loaded machine lets the run go on for many steps between two polls
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "dickens.txt").write_text(TEXT * 8, encoding="utf-8")
    runtime = {"checkpoint_every": 2, "log_every": 1}
    spec_a = write_spec(_raw(tmp_path, "a", runtime=runtime), tmp_path / "a.yaml")
    spec_b = write_spec(_raw(tmp_path, "b", runtime=runtime), tmp_path / "b.yaml")
    assert run_cli("train", str(spec_a), "--quiet").returncode == 0
    proc = popen_cli("train", str(spec_b), "--quiet")
    t0 = time.time()
    while not any(r["global_step"] >= 7 for r in _steps(tmp_path / "b")):
        assert proc.poll() is None and time.time() - t0 < 240, "run B ended or stalled before step 7"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    pos = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)["position"]
    per_epoch = max(r["step"] for r in _steps(tmp_path / "a") if r["epoch"] == 0) + 1
    assert per_epoch >= 100
    assert pos["epoch"] == 0 and 0 < pos["step"] < per_epoch  # mid-epoch
    res = run_cli("train", str(spec_b), "--quiet", "--resume")
    assert res.returncode == 0, res.stderr
    a, b = (load_file(str(tmp_path / n / "student.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    sa, sb = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("a", "b"))
    assert sa["student_bpb"] == sb["student_bpb"]


def test_export_loads_in_plain_transformers_with_the_students_logits(trained, tmp_path):
    from kdgraph.compiler import compile_spec
    from kdgraph.runtime.commands import export_spec

    spec, _, tmp = trained
    shipped = export_spec(spec, tmp_path / "hf")
    assert shipped["format"] == "transformers"
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files
    student = compile_spec(spec).student.model.eval()
    student.load_state_dict(load_file(str(tmp / "run" / "student.safetensors")))
    ids = torch.from_numpy(_heldout_by_hand(TEXT)[:2, :-1])
    with torch.no_grad():
        ours = student(ids)
    np.save(tmp_path / "ids.npy", ids.numpy())
    script = ("import sys, numpy as np, torch, transformers\n"
              "assert 'kdgraph' not in sys.modules\n"
              f"lm = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}).eval()\n"
              f"ids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r}))\n"
              "with torch.no_grad():\n"
              "    np.save(sys.argv[1], lm(input_ids=ids).logits.numpy())\n"
              "    lm.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)\n"
              "print('kdgraph' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "logits.npy")], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    theirs = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    assert torch.equal(theirs, ours)


def test_export_writes_into_an_empty_folder_its_own_earlier_export_or_a_killed_one_and_nothing_else(trained,
                                                                                                 tmp_path):
    import transformers

    from kdgraph.errors import KDGraphError
    from kdgraph.runtime.commands import export_spec
    from kdgraph.runtime.ship import INCOMPLETE

    spec, _, tmp = trained
    state = load_file(str(tmp / "run" / "student.safetensors"))

    def shipped_is_the_student(folder):
        assert not (folder / INCOMPLETE).exists()
        lm = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
        return all(torch.equal(v, state[f"lm.{k}"]) for k, v in lm.state_dict().items() if f"lm.{k}" in state)

    empty = tmp_path / "empty"
    empty.mkdir()
    export_spec(spec, empty)
    assert shipped_is_the_student(empty)
    export_spec(spec, empty)  # again, over its own earlier export
    assert shipped_is_the_student(empty)
    killed = tmp_path / "killed"  # an export killed while it wrote the weights
    killed.mkdir()
    (killed / INCOMPLETE).write_text("kdgraph export was writing this folder; run it again\n")
    (killed / "model.safetensors").write_bytes(b"half a file")
    export_spec(spec, killed)
    assert shipped_is_the_student(killed)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "llama"}')
    (mine / "kdgraph.json").write_text('{"not": "an export record"}')
    with pytest.raises(KDGraphError, match="not a kdgraph export"):
        export_spec(spec, mine)
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "kdgraph.json"]
    assert (mine / "config.json").read_text() == '{"model_type": "llama"}'



def _tokenizer_raw(tmp_path: Path, vocab: int = 300, teacher_vocab: int = 300) -> dict:
    from _runtime_helpers import tiny_tokenizer

    if not (tmp_path / "tok").exists():
        tiny_tokenizer(tmp_path / "tok", TEXT.split(", "), vocab_size=300)
    raw = _raw(tmp_path, data={"tokenizer": str(tmp_path / "tok"), "seq_len": 8, "batch_size": 4},
               schedule={"epochs": 1})
    raw["student"]["kwargs"]["vocab_size"] = vocab
    raw["teacher"]["kwargs"]["vocab_size"] = teacher_vocab
    return raw


def test_a_tokenizer_folder_trains_scores_bits_per_decoded_byte_and_ships_beside_the_model(tmp_path):
    """data.tokenizer: the token file is the tokenizer's ids of the text (then <eos>); bits per
    byte divide by each held-out target row's decoded UTF-8 bytes (recomputed here from the
    student's weights); export writes the tokenizer files AutoTokenizer loads, ids unchanged."""
    import transformers

    from kdgraph.runtime.commands import export_spec

    spec = load_spec(_tokenizer_raw(tmp_path))
    summary = train_here(spec)
    made = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ids = np.asarray(made(TEXT, add_special_tokens=False)["input_ids"] + [made.eos_token_id], dtype=np.int64)
    held = ids[len(ids) - int(len(ids) * 0.05):]
    windows = np.stack([held[i * 8:i * 8 + 9] for i in range((len(held) - 1) // 8)])
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_kwargs(32, 1), "vocab_size": 300})).eval()
    lm.load_state_dict({k.removeprefix("lm."): v for k, v in load_file(str(tmp_path / "run" /
                                                                            "student.safetensors")).items()})
    w = torch.from_numpy(windows)
    with torch.no_grad():
        nats = F.cross_entropy(lm(input_ids=w[:, :-1]).logits.flatten(0, 1), w[:, 1:].reshape(-1),
                               reduction="sum").item()
    nbytes = sum(len(made.decode(row[1:].tolist()).encode("utf-8")) for row in windows)
    assert nbytes > w[:, 1:].numel()  # BPE ids hold more than a byte each
    assert summary["student_loss"] == pytest.approx(nats / w[:, 1:].numel(), rel=1e-5)
    assert summary["student_bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    export_spec(spec, tmp_path / "hf")
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    shipped = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert shipped(TEXT, add_special_tokens=False)["input_ids"] == ids[:-1].tolist()
    assert shipped.eos_token_id == made.eos_token_id
    assert str(tmp_path / "tok") in json.loads((tmp_path / "hf" / "kdgraph.json").read_text())["tokenizer"]


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_a_tokenizer_larger_than_a_models_vocabulary_is_refused(who, tmp_path):
    raw = _tokenizer_raw(tmp_path, **({"vocab": 256} if who == "student" else {"teacher_vocab": 256}))
    res = run_cli("train", str(write_spec(raw, tmp_path / "lm.yaml")), "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"data.tokenizer has 300 ids but the {who}'s vocabulary holds 256" in res.stderr


def test_another_tokenizer_is_another_token_file_and_a_resume_is_refused(tmp_path):
    from _runtime_helpers import tiny_tokenizer
    from kdgraph.compiler import compile_spec
    from kdgraph.runtime.techniques import DistInfo
    from kdgraph.tasks.create import create_task

    def data():
        spec = load_spec(_tokenizer_raw(tmp_path))
        return create_task(spec, compile_spec(spec)).build_data(spec, None, torch.device("cpu"), DistInfo())

    first = data()
    state = first.state_dict(0, 1)
    tiny_tokenizer(tmp_path / "tok", TEXT.split(", "), vocab_size=300, lowercase=True)  # its normaliser changed
    second = data()
    assert second.tokens != first.tokens
    assert len(list((tmp_path / "run" / "tokens").glob("*.tokens"))) == 2
    with pytest.raises(DataError, match="other training data.*tokens"):
        second.check_resume(state, "last.pt")

"""kdgraph.runtime.metrics: metrics.jsonl written, read back and cut back on resume (a line a
kill cut short dropped, any other bad line refused with the file untouched), against records
written out by hand; WaitTimed against a batch iterator that sleeps known times."""

from __future__ import annotations

import json
import time

import pytest

from kdgraph.errors import KDGraphError
from kdgraph.runtime.metrics import Metrics, WaitTimed, kept_lines
from kdgraph.runtime.runs import RunFolder
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec, train_here


def _records(steps):
    return [{"kind": "step", "global_step": s, "loss": 1.0 / (s + 1)} for s in steps]


def _file(folder: RunFolder, records, tail: str = "") -> str:
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    folder.metrics.write_text(text)
    return text


def test_write_then_read_round_trips_with_a_time_stamp(tmp_path):
    folder = RunFolder(tmp_path)
    metrics = Metrics(folder, enabled=True, keep_until_step=None)
    for record in _records([1, 2]):
        metrics.write(record)
    metrics.close()
    back = metrics.read()
    assert [{k: v for k, v in r.items() if k != "time"} for r in back] == _records([1, 2])
    assert all(r["time"].endswith("+00:00") for r in back) and list(back[0])[0] == "time"
    assert folder.metrics.read_text().endswith("\n") and len(folder.metrics.read_text().splitlines()) == 2


def test_a_fresh_run_starts_an_empty_file_and_a_non_main_rank_writes_nothing(tmp_path):
    folder = RunFolder(tmp_path)
    _file(folder, _records([1, 2, 3]))
    Metrics(folder, enabled=True, keep_until_step=None)  # not a resume: the old records go
    assert folder.metrics.read_text() == ""
    _file(folder, _records([1]))
    other = Metrics(folder, enabled=False, keep_until_step=None)
    other.write(_records([2])[0])
    assert folder.metrics.read_text() == json.dumps(_records([1])[0]) + "\n"


def test_resume_keeps_the_records_up_to_the_checkpoints_step(tmp_path):
    folder = RunFolder(tmp_path)
    _file(folder, _records([1, 2, 3, 4, 5]) + [{"kind": "epoch", "global_step": 3, "epoch": 0}], tail="\n")
    Metrics(folder, enabled=True, keep_until_step=3)
    kept = [json.loads(ln) for ln in folder.metrics.read_text().splitlines()]
    assert kept == _records([1, 2, 3]) + [{"kind": "epoch", "global_step": 3, "epoch": 0}]


@pytest.mark.parametrize("cut", [1, 10, -1])
def test_resume_drops_a_last_line_a_kill_cut_short(tmp_path, cut):
    """The killed process got part of its last record out (no newline, not JSON): the resume
    drops that line alone and goes on; before the fix this raised JSONDecodeError."""
    folder = RunFolder(tmp_path)
    whole = json.dumps(_records([3])[0])
    _file(folder, _records([1, 2]), tail=whole[:cut])
    metrics = Metrics(folder, enabled=True, keep_until_step=3)
    assert folder.metrics.read_text() == "".join(json.dumps(r) + "\n" for r in _records([1, 2]))
    metrics.write(_records([3])[0])
    assert [r["global_step"] for r in metrics.read()] == [1, 2, 3]


def test_a_last_record_missing_only_its_newline_is_kept(tmp_path):
    folder = RunFolder(tmp_path)
    _file(folder, _records([1]), tail=json.dumps(_records([2])[0]))
    assert kept_lines(folder.metrics, 5) == [json.dumps(r) for r in _records([1, 2])]
    assert kept_lines(folder.metrics, 1) == [json.dumps(_records([1])[0])]


@pytest.mark.parametrize("bad", ['{"kind": "step", "glob', "not json", '{"kind": "step"}', "[1, 2]",
                                 '{"kind": "step", "global_step": "3"}'])
def test_a_whole_line_that_is_no_record_is_refused_and_the_file_kept(tmp_path, bad):
    """A whole line (its newline written) that is no record is no kill's doing: kdgraph does not
    guess what it held, says which line, and leaves metrics.jsonl as it was."""
    folder = RunFolder(tmp_path)
    text = _file(folder, _records([1]), tail=bad + "\n" + json.dumps(_records([2])[0]) + "\n")
    with pytest.raises(KDGraphError, match=r"metrics.jsonl: line 2 is not a metrics record") as err:
        Metrics(folder, enabled=True, keep_until_step=5)
    assert "\n" not in str(err.value)
    assert folder.metrics.read_text() == text


def test_bytes_that_are_no_text_are_a_refused_line_or_a_dropped_cut_short_one(tmp_path):
    folder = RunFolder(tmp_path)
    good = json.dumps(_records([1])[0]).encode() + b"\n"
    folder.metrics.write_bytes(good + b"\xff\xfe{\n" + good)
    with pytest.raises(KDGraphError, match="line 2 is not a metrics record"):
        kept_lines(folder.metrics, 5)
    folder.metrics.write_bytes(good + b'{"kind": "st\xff')
    assert kept_lines(folder.metrics, 5) == [good.decode().strip()]


def test_a_bad_whole_last_line_is_refused_too(tmp_path):
    folder = RunFolder(tmp_path)
    text = _file(folder, _records([1]), tail="garbage\n")
    with pytest.raises(KDGraphError, match=r"metrics\.jsonl: line 2 is not a metrics record \(JSON with a "
                                           r"global_step\); kdgraph wrote none such: mend or remove that line"):
        kept_lines(folder.metrics, 5)
    assert folder.metrics.read_text() == text


def test_blank_lines_and_a_missing_file(tmp_path):
    folder = RunFolder(tmp_path)
    assert kept_lines(folder.metrics, 3) == []
    _file(folder, _records([1]), tail="\n  \n")
    assert kept_lines(folder.metrics, 3) == [json.dumps(_records([1])[0])]


def test_a_run_killed_mid_line_resumes_to_the_uninterrupted_runs_records(tmp_path, monkeypatch):
    """A real run killed while writing a line (half of it out), resumed: its step records
    equal those of the same run never interrupted (measured speeds and times aside)."""
    class Killed(BaseException):
        pass

    write = Metrics.write

    def killed_mid_step_5(self, record):  # the checkpoint is step 3's
        if record["kind"] == "step" and record["global_step"] == 5:
            line = json.dumps(record)
            with self.path.open("a") as f:
                f.write(line[: len(line) // 2])
            raise Killed
        write(self, record)

    monkeypatch.chdir(tmp_path)
    def spec(name):
        return load_spec(tiny_spec(tmp_path / name, "supervised", blocks=2, epochs=1, fraction=0.05, batch_size=8,
                                   runtime={"log_every": 1, "checkpoint_every": 3}))

    whole, killed = spec("whole"), spec("killed")
    with monkeypatch.context() as patch:  # the truth's curves.png is not needed (the resumed run's is drawn)
        patch.setattr("kdgraph.runtime.loop.plot_curves", lambda *args, **kwargs: None)
        train_here(whole)
    monkeypatch.setattr(Metrics, "write", killed_mid_step_5)
    with pytest.raises(Killed):
        train_here(killed)
    monkeypatch.setattr(Metrics, "write", write)
    assert not RunFolder(tmp_path / "killed").metrics.read_text().endswith("\n")
    import torch

    from kdgraph.runtime.loop import train

    threads = torch.get_num_threads()
    try:
        train(killed, resume=True)
    finally:
        torch.set_num_threads(threads)

    def steps(name):
        keep = ("global_step", "epoch", "step", "lr", "loss")
        return [{k: r.get(k) for k in keep} for r in Metrics(RunFolder(tmp_path / name), False, None).read()
                if r["kind"] == "step"]

    assert len(steps("whole")) > 5 and steps("killed") == steps("whole")
    assert RunFolder(tmp_path / "killed").curves.exists()  # drawn from the cut-back file, read whole


def test_wait_timed_adds_up_the_waits_for_each_batch():
    def batches():
        for i in range(3):
            time.sleep(0.02)
            yield i

    timed = WaitTimed(batches())
    assert iter(timed) is timed
    got, work, t0 = [], 0.0, time.perf_counter()
    for batch in timed:
        got.append(batch)
        w0 = time.perf_counter()
        time.sleep(0.05)  # the loop's own work: not a wait
        work += time.perf_counter() - w0
    elapsed = time.perf_counter() - t0
    assert got == [0, 1, 2]
    assert 0.06 <= timed.waited <= elapsed - work + 1e-6

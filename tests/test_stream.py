"""The streaming path for image folders (kdgraph.stream, kdgraph.imagefolder): exact resume
mid-epoch, batches independent of the worker count, timm's eval transform against a hand
computation, unreadable images skipped and counted (or refused), one-line layout errors,
the automatic choice between the in-memory and the streaming loader.

Every test writes its own tiny folder of PNGs (3 classes x 8 train / 4 val images)."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kdgraph.data import DeviceLoader, build_data
from kdgraph.errors import DataError, SpecError
from kdgraph.imagefolder import BadImageWarning, scan_imagefolder
from kdgraph.runtime import loop
from kdgraph.spec import DataSpec, load_spec
from kdgraph.stream import (EpochSampler, Normalizer, StreamDataset, StreamLoader, WorkerOptions, eval_transform,
                            train_transform)
from kdgraph.compiler.data import plan_data

from _runtime_helpers import tiny_spec, train_here

CLASSES = ("ant", "bee", "cat")


def write_folder(root: Path, *, channels: int = 1, side: int = 16, train: int = 8, val: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for k, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (side, side) if channels == 1 else (side, side, 3)
                pixels = (rng.random(shape) * 100 + 70 * k).astype(np.uint8)  # class-dependent brightness
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def folder_spec(root: Path, out: Path, *, channels: int = 1, epochs: int = 2, loader: str = "stream",
                workers: int = 2, **data) -> dict:
    spec = tiny_spec(out, "kd", epochs=epochs, batch_size=4, fraction=1.0,
                     runtime={"num_workers": workers, "checkpoint_every": 0})
    spec["data"] = {"dataset": "imagefolder", "root": str(root), "input_size": [channels, 8, 8],
                    "batch_size": 4, "loader": loader, **data}
    for role in ("teacher", "student"):
        spec[role]["kwargs"].update(num_classes=len(CLASSES), in_chans=channels)
    return spec


def data_spec(root, **kw) -> DataSpec:
    base = dict(dataset="imagefolder", root=root, input_size=(1, 8, 8), num_classes=None, loader="auto",
                memory_budget_mb=2048, mean=None, std=None, crop_pct=None)
    return DataSpec(**{**base, **kw})


def _student(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student.safetensors"))


def _step_losses(out: Path) -> list[dict]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("epoch", "step", "global_step", "lr", "loss", "ce", "kl")}
            for r in recs if r["kind"] == "step"]


# ------------------------------------------------------------------------- resume


def test_resume_mid_epoch_is_bit_identical(tmp_path, monkeypatch):
    """Run B is stopped (the loop's SIGINT path) at epoch 1, step 2 with 2 workers and resumed
    with none; it must end with run A's student, bit for bit, and replay A's per-step losses."""
    root = write_folder(tmp_path / "images")
    summary_a = train_here(load_spec(folder_spec(root, tmp_path / "a")))
    steps_per_epoch = 24 // 4

    calls = {"n": 0}
    real_step = loop.Trainer.train_step

    def stopping_step(trainer, xb, yb):
        out = real_step(trainer, xb, yb)
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 2:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does: the loop saves and stops
        return out

    monkeypatch.setattr(loop.Trainer, "train_step", stopping_step)
    with pytest.raises(loop.TrainingInterrupted, match="epoch 2, step 2"):
        train_here(load_spec(folder_spec(root, tmp_path / "b")))
    monkeypatch.setattr(loop.Trainer, "train_step", real_step)
    state = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert state["position"] == {"epoch": 1, "step": 2, "global_step": steps_per_epoch + 2}
    assert state["data"]["loader"] == "stream" and state["data"]["num_samples"] == 24

    resumed = load_spec(folder_spec(root, tmp_path / "b", workers=0))
    from kdgraph.runtime.loop import train

    summary_b = train(resumed, resume=True)
    a, b = _student(tmp_path / "a"), _student(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _step_losses(tmp_path / "a") == _step_losses(tmp_path / "b")
    assert summary_a["student_top1"] == summary_b["student_top1"]
    assert summary_a["data"]["loader"] == "stream" and summary_a["data"]["bad_images"] == 0


def test_resume_refuses_changed_data(tmp_path):
    root = write_folder(tmp_path / "images")
    spec = load_spec(folder_spec(root, tmp_path / "out", workers=0))
    from kdgraph.compiler import compile_spec

    data = build_data(spec, compile_spec(spec).data, torch.device("cpu"), SimpleNamespace(rank=0, world_size=1))
    state = data.state_dict(1, 2)
    data.check_resume(state, "last.pt")  # the same data: fine
    with pytest.raises(DataError, match="num_samples 30 then, 24 now"):
        data.check_resume({**state, "num_samples": 30}, "last.pt")


def test_validation_split_streamed_as_in_memory(tmp_path):
    """data.val_fraction on a streamed folder holds out the training files the in-memory path
    holds out (the same indices of train/), read as the test split is: in order, not augmented."""
    from kdgraph.compiler import compile_spec

    root = write_folder(tmp_path / "images", train=8)
    one = SimpleNamespace(rank=0, world_size=1)
    built = {}
    for loader in ("stream", "memory"):
        spec = load_spec(folder_spec(root, tmp_path / loader, workers=0, loader=loader, val_fraction=0.25, fraction=0.5))
        built[loader] = build_data(spec, compile_spec(spec).data, torch.device("cpu"), one)
    streamed, held = built["stream"], built["memory"]
    folder = scan_imagefolder(root)
    assert streamed.eval_split == "val" and streamed.eval_loader is streamed.val
    files = [str(f) for f in streamed.val.dataset.files]
    assert all("/train/" in f for f in files) and not set(files) & {str(f) for f in streamed.train.dataset.files}
    assert [sum(f"/{c}/" in f for f in files) for c in CLASSES] == [2, 2, 2]  # round(0.25 * 8) a class
    assert [sum(f"/{c}/" in str(f) for f in streamed.train.dataset.files) for c in CLASSES] == [3, 3, 3]  # half of 6
    assert len(streamed.test.dataset.files) == len(folder.test_files)
    labels = torch.cat([y for _, y in streamed.val.epoch(0)])
    assert torch.equal(labels.cpu(), held.val.y.cpu())  # the same images, in the same order, as in memory
    assert not streamed.val.shuffle


def test_validation_folder_streamed(tmp_path):
    """A root with val/ and test/ and a validation split asked for: val/ validates, test/ tests,
    all of train/ trains; `kdgraph plan` says so."""
    from kdgraph.compiler import compile_spec

    root = write_folder(tmp_path / "images", train=6, val=2)
    for cls in CLASSES:
        shutil.copytree(root / "val" / cls, root / "test" / cls)
    spec = load_spec(folder_spec(root, tmp_path / "out", workers=0, val_fraction=0.1))
    plan = compile_spec(spec).data
    assert "val/ is the validation split, test/ is read once at the end" in plan.reason
    data = build_data(spec, plan, torch.device("cpu"), SimpleNamespace(rank=0, world_size=1))
    assert data.eval_split == "val" and len(data.train.dataset.files) == 18
    assert all("/val/" in str(f) for f in data.val.dataset.files) and len(data.val.dataset.files) == 6
    assert all("/test/" in str(f) for f in data.test.dataset.files) and len(data.test.dataset.files) == 6
    plain = load_spec(folder_spec(root, tmp_path / "plain", workers=0))
    assert "val/ is evaluated, test/ is not read" in compile_spec(plain).data.reason


# ---------------------------------------------------------------------- batches


def _stream(root: Path, workers: int, *, channels: int = 1, world_size: int = 1, rank: int = 0) -> StreamLoader:
    folder = scan_imagefolder(root)
    size = (channels, 8, 8)
    transform = train_transform(size, "crop+flip", 0.875, (0.08, 1.0))
    ds = StreamDataset(folder.train_files, folder.train_labels, 3, channels, transform, seed=7)
    return StreamLoader(ds, 5, shuffle=True, seed=7, drop_last=True, rank=rank, world_size=world_size,
                        workers=WorkerOptions(num_workers=workers, persistent_workers=True))


@pytest.mark.parametrize("augment", ["crop+flip", "crop", "none"])
def test_uint8_batches_normalised_equal_torchvision_and_timm_per_sample(tmp_path, augment):
    """Workers crop and flip whole uint8 batches, the loader normalises them (Normalizer).
    Independent truth, sample by sample: torchvision's own resized_crop and hflip at the boxes
    the batch reports, then ToTensor and Normalize; without augmentation, timm's own
    normalising evaluation transform."""
    import torchvision.transforms.functional as TF

    folder = scan_imagefolder(write_folder(tmp_path / "images", channels=3, side=19))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    tf = train_transform((3, 8, 8), augment, 0.875, (0.08, 1.0))
    raw = StreamDataset(folder.train_files, folder.train_labels, 3, 3, tf, seed=3)
    keys = [(i, 2) for i in range(len(raw))]
    x, y, bad = raw.__getitems__(keys)
    assert x.dtype == torch.uint8 and x.shape == (24, 3, 8, 8) and not bad
    assert y.tolist() == folder.train_labels.tolist()
    got = Normalizer(mean, std, torch.device("cpu"))(x)
    images = [Image.open(f).convert("RGB") for f in folder.train_files]
    if augment == "none":
        timm_tf = eval_transform((3, 8, 8), mean, std, 0.875)
        want = torch.stack([timm_tf(im) for im in images])
    else:
        from kdgraph.transforms import sample_seeds

        top, left, h, w, flipped = tf.boxes(images, sample_seeds(3, 2, np.arange(24)))
        assert (flipped.any() and not flipped.all()) if augment == "crop+flip" else not flipped.any()
        assert len({(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(top, left, h, w)}) > 20
        want = []
        for k, im in enumerate(images):
            im = TF.resized_crop(im, int(top[k]), int(left[k]), int(h[k]), int(w[k]), [8, 8],
                                 TF.InterpolationMode.BILINEAR)
            want.append(TF.normalize(TF.to_tensor(TF.hflip(im) if flipped[k] else im), mean, std))
        want = torch.stack(want)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(raw[(5, 2)][0], x[5])  # one sample alone: the same as in its batch


@pytest.mark.parametrize("channels", [1, 3])
def test_zero_and_two_workers_give_identical_batches(tmp_path, channels):
    root = write_folder(tmp_path / "images", channels=channels)
    inline, workers = _stream(root, 0, channels=channels), _stream(root, 2, channels=channels)
    rng_before = torch.get_rng_state()
    for epoch in (0, 1):
        a, b = list(inline.epoch(epoch)), list(workers.epoch(epoch))
        assert len(a) == len(b) == len(inline) == 24 // 5
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xa.shape == (5, channels, 8, 8) and torch.equal(xa, xb) and torch.equal(ya, yb)
        # plain NCHW strides: for one channel, a permuted NHWC array's strides also read as
        # channels_last, and a CPU training step (torch 2.14.1) aborted in backward on them
        raw = workers.dataset.__getitems__([(0, epoch), (1, epoch)])[0]
        assert raw.stride() == torch.empty(raw.shape).stride()
    assert torch.equal(torch.get_rng_state(), rng_before)  # augmentation leaves the trainer's RNG alone
    # a resumed epoch starts at its step with the same batches; epochs differ
    assert all(torch.equal(p[0], q[0]) for p, q in zip(list(workers.epoch(1))[2:], workers.epoch(1, start_step=2)))
    assert not torch.equal(next(inline.epoch(0))[0], next(inline.epoch(1))[0])


def test_resume_skips_without_decoding(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "images")
    loader = _stream(root, 0)
    seen = []
    real = StreamDataset.__getitems__
    monkeypatch.setattr(StreamDataset, "__getitems__", lambda self, keys: seen.extend(keys) or real(self, keys))
    assert len(list(loader.epoch(3, start_step=3))) == 1
    assert len(seen) == 5  # one batch of 5 decoded, not the 15 before it
    assert seen == [(i, 3) for i in loader.sampler.order(3)[15:20].tolist()]


def test_sampler_shards_like_device_loader(tmp_path):
    """The epoch order and the rank split are DeviceLoader's (DistributedSampler-like)."""
    y = torch.arange(22)
    for rank in range(3):
        device = DeviceLoader(torch.zeros(22, 1, 2, 2), y, 3, shuffle=True, seed=4, rank=rank, world_size=3)
        sampler = EpochSampler(22, 3, shuffle=True, seed=4, rank=rank, world_size=3)
        sampler.set_position(2)
        keys = [k for batch in sampler for k in batch]
        assert [i for i, _ in keys] == torch.cat([yb for _, yb in device.epoch(2)]).tolist()
        assert len(sampler) == len(device) == 3 and {e for _, e in keys} == {2}
    orders = [EpochSampler(22, 3, shuffle=True, seed=4, rank=r, world_size=3, drop_last=True).order(0) for r in range(3)]
    assert len(set(torch.cat(orders).tolist())) == 21  # disjoint shards


# ------------------------------------------------------------- workers and waiting


def test_auto_workers(monkeypatch):
    from kdgraph import stream

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(stream, "available_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert stream.resolve_workers("auto", cpu) == 2  # the workers share the training's cores
    assert stream.resolve_workers("auto", cuda) == 8  # 15 free CPUs, at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert stream.resolve_workers("auto", cuda) == 3  # 16 CPUs over 4 ranks, less the trainer
    monkeypatch.setattr(stream, "available_cpus", lambda: 2)
    assert stream.resolve_workers("auto", cuda) == 1
    assert stream.resolve_workers(0, cuda) == 0 and stream.resolve_workers(5, cpu) == 5


def test_waiting_for_data_is_measured_and_a_starved_run_says_so(tmp_path, monkeypatch, capsys):
    """Workers slowed to 40 ms a batch against a tiny model's millisecond step: the epochs
    report most of their time as waiting for data, the run warns once and names
    runtime.num_workers; the in-memory path over the same folder waits for nothing."""
    import time as _time

    root = write_folder(tmp_path / "images")
    fast = train_here(load_spec(folder_spec(root, tmp_path / "memory", loader="memory")))
    real = StreamDataset.__getitems__

    def slow(self, keys):
        _time.sleep(0.04)
        return real(self, keys)

    monkeypatch.setattr(StreamDataset, "__getitems__", slow)
    capsys.readouterr()
    summary = train_here(load_spec(folder_spec(root, tmp_path / "stream", workers=0)))
    out = capsys.readouterr().out
    epochs = [json.loads(ln) for ln in (tmp_path / "stream" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["data_wait_share"] for r in epochs if r["kind"] == "epoch"]
    assert len(shares) == 2 and all(0.5 < s <= 1.0 for s in shares)
    assert 0.5 < summary["data_wait_share"] <= 1.0 and summary["data"]["workers"] == 0
    assert out.count("waited for data") == 1 and "raise runtime.num_workers (now 0," in out
    assert "waiting for data" in out  # the epoch line
    assert fast["data_wait_share"] < 0.25 and "workers" not in fast["data"]


# ------------------------------------------------------------------- transforms


def test_eval_transform_is_resize_then_centre_crop():
    """crop_pct 0.5 at side 8: resize the shorter side to floor(8 / 0.5) = 16 (the image's own:
    no resampling), centre-crop 8 x 8, normalise: computed by hand."""
    rng = np.random.default_rng(1)
    tf = eval_transform((1, 8, 8), (0.5,), (0.25,), 0.5)
    for h, w in ((16, 16), (16, 32)):
        pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
        top, left = (h - 8) // 2, (w - 8) // 2
        want = (pixels[top:top + 8, left:left + 8].astype(np.float32) / 255 - 0.5) / 0.25
        got = tf(Image.fromarray(pixels).convert("L"))
        assert got.shape == (1, 8, 8)
        torch.testing.assert_close(got[0], torch.from_numpy(want), atol=1e-6, rtol=0)
    # crop_pct 1: a 16-px image is resized to 8 (a constant stays constant), nothing cropped
    flat = eval_transform((3, 8, 8), (0.0,) * 3, (1.0,) * 3, 1.0)(Image.new("RGB", (16, 16), (51, 102, 204)))
    torch.testing.assert_close(flat, torch.tensor([0.2, 0.4, 0.8])[:, None, None].expand(3, 8, 8))


def test_train_transform_is_random_resized_crop_and_flip():
    from kdgraph.transforms import RandomResizedCropFlip

    tf = train_transform((3, 8, 6), "crop+flip", 0.875, (0.5, 1.0))
    assert isinstance(tf, RandomResizedCropFlip) and tf.flip and tf.size == (8, 6) and tf.scale == (0.5, 1.0)
    assert tf.ratio == pytest.approx((3 / 4, 4 / 3))
    assert not train_transform((3, 8, 8), "crop", 0.875, (0.08, 1.0)).flip
    assert not isinstance(train_transform((3, 8, 8), "none", 0.875, (0.08, 1.0)), RandomResizedCropFlip)


# --------------------------------------------------------------------- bad input


def test_corrupt_image_is_skipped_with_a_warning_and_counted(tmp_path):
    root = write_folder(tmp_path / "images")
    bad = root / "train" / "bee" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    spec = load_spec(folder_spec(root, tmp_path / "out", epochs=1, workers=0))
    with pytest.warns(BadImageWarning, match=r"skipping unreadable image .*bee/3\.png"):
        summary = train_here(spec)
    assert summary["data"]["bad_images"] == 1 and summary["data"]["bad_files"] == [str(bad)]
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["data"]["bad_images"] == 1
    # `kdgraph eval` reads the data as training did: the same loader, normalisation and accuracy
    from kdgraph.runtime.commands import evaluate_spec

    evaluated = evaluate_spec(spec)  # (its teacher is another random init: no checkpoint)
    assert evaluated["student_top1"] == summary["student_top1"] and evaluated["samples"] == 12

    refuse = load_spec(folder_spec(root, tmp_path / "out2", epochs=1, workers=0, on_bad_image="error"))
    with pytest.raises(DataError, match=r"cannot decode .*bee/3\.png.*on_bad_image: skip"):
        train_here(refuse)


def test_a_batch_with_no_readable_image_is_an_error_naming_its_files(tmp_path):
    """Every file of a batch unreadable (a folder whose images were all truncated): one
    DataError naming them, from a worker as from the training process."""
    root = write_folder(tmp_path / "images")
    for f in (root / "train").rglob("*.png"):
        f.write_bytes(f.read_bytes()[:60])
    for workers in (0, 2):
        loader = _stream(root, workers)
        with pytest.warns(BadImageWarning), pytest.raises(DataError, match=r"no image of a batch could be read "
                                                                             r"\(.*\.png, .*\.png"):
            next(iter(loader.epoch(0)))


def test_corrupt_image_in_memory_path_is_skipped_too(tmp_path):
    root = write_folder(tmp_path / "images")
    (root / "val" / "cat" / "0.png").write_bytes(b"not a png at all")
    spec = load_spec(folder_spec(root, tmp_path / "out", loader="memory"))
    from kdgraph.compiler import compile_spec

    with pytest.warns(BadImageWarning, match="cat/0.png"):
        data = build_data(spec, compile_spec(spec).data, torch.device("cpu"), SimpleNamespace(rank=0, world_size=1))
    assert data.record()["bad_images"] == 1 and len(data.test.y) == 11


def test_num_classes_disagreeing_with_the_folder(tmp_path):
    root = write_folder(tmp_path / "images")
    with pytest.raises(DataError, match=r"data.num_classes: the spec says 5, .*train has 3 class folders "
                                        r"\(ant, bee, cat\)") as err:
        plan_data(data_spec(root, num_classes=5), None, torch.nn.Identity(), (1, 8, 8))
    assert "\n" not in str(err.value)


def test_labels_out_of_range_refused():
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.2, got 0\.\.3"):
        StreamDataset(np.array(["a", "b"]), np.array([0, 3]), 3, 1, None, seed=0)


# ---------------------------------------------------------------- loader choice


def test_auto_choice_follows_the_memory_budget(tmp_path):
    root = write_folder(tmp_path / "images")  # 36 images x 1x8x8 uint8 = 2 KB decoded
    student = torch.nn.Identity()
    small = plan_data(data_spec(root), None, student, (1, 8, 8))
    assert small.loader == "memory" and "<= data.memory_budget_mb 2048" in small.reason
    assert (small.train_images, small.test_images) == (24, 12)
    big = plan_data(data_spec(root, memory_budget_mb=25), None, student, (3, 512, 512))  # 36 x 0.75 MB
    assert big.loader == "stream" and "auto: 36 images, 27.0 MB decoded > data.memory_budget_mb 25" in big.reason
    # uint8 in memory: four times the images of a float32 count fit the same budget
    assert plan_data(data_spec(root, memory_budget_mb=27), None, student, (3, 512, 512)).loader == "memory"
    forced = plan_data(data_spec(root, loader="stream"), None, student, (1, 8, 8))
    assert forced.loader == "stream" and "data.loader: stream" in forced.reason
    assert plan_data(data_spec(root, memory_budget_mb=1, loader="memory"), None, student, (3, 512, 512)).loader \
        == "memory"
    digits = plan_data(DataSpec(dataset="digits"), None, student, (1, 8, 8))
    assert digits.loader == "memory" and digits.mean is None


def test_plan_shows_the_loader(tmp_path):
    from typer.testing import CliRunner

    from _runtime_helpers import write_spec
    from kdgraph.cli.main import app

    root = write_folder(tmp_path / "images")
    path = write_spec(folder_spec(root, tmp_path / "out", loader="auto"), tmp_path / "spec.yaml")
    res = CliRunner().invoke(app, ["plan", str(path), "--set", "data.memory_budget_mb=1",
                                   "--set", "data.input_size=[3,128,128]", "--set", "teacher.kwargs.in_chans=3",
                                   "--set", "student.kwargs.in_chans=3"], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert "stream (auto: 36 images, 1.7 MB decoded > data.memory_budget_mb 1)" in res.output
    res = CliRunner().invoke(app, ["plan", str(path), "--format", "json"])
    assert json.loads(res.output)["data"]["loader"] == "memory"


def test_stream_needs_an_image_folder():
    with pytest.raises(SpecError, match="streaming loader reads image folders"):
        load_spec({"name": "x", "student": {"model": "timm:resnet10t"}, "data": {"loader": "stream"}})
    with pytest.raises(SpecError, match="give both or neither"):
        load_spec({"name": "x", "student": {"model": "timm:resnet10t"},
                   "data": {"dataset": "imagefolder", "mean": [0.5]}})


def test_mean_std_from_the_teachers_pretrained_cfg(tmp_path):
    import timm

    root = write_folder(tmp_path / "images", channels=3)
    teacher = timm.create_model("resnet10t", num_classes=3)
    rgb = plan_data(data_spec(root, input_size=(3, 8, 8)), teacher, torch.nn.Identity(), (3, 8, 8))
    assert rgb.mean == tuple(teacher.pretrained_cfg["mean"]) and rgb.std == tuple(teacher.pretrained_cfg["std"])
    assert rgb.stats == "the teacher's pretrained_cfg" and rgb.crop_pct == teacher.pretrained_cfg["crop_pct"]
    grey = plan_data(data_spec(root), teacher, torch.nn.Identity(), (1, 8, 8))  # 3 values for 1 channel
    assert grey.mean is None and grey.stats == "the training split's statistics"
    own = plan_data(data_spec(root, input_size=(3, 8, 8), mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0),
                              crop_pct=1.0), teacher, torch.nn.Identity(), (3, 8, 8))
    assert own.mean == (0.1, 0.2, 0.3) and own.stats == "the spec (data.mean/std)" and own.crop_pct == 1.0


# ------------------------------------------------------------- normalising, prefetching


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalizer_is_one_op_into_the_steps_layout(channels_last):
    """uint8 -> normalised float32 by one addcmul written straight into the layout the step uses
    (plain NCHW strides unless channels_last), equal to (x / 255 - mean) / std to fp32 rounding."""
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    x = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    normalizer = Normalizer(mean, std, torch.device("cpu"), channels_last)
    with torch.profiler.profile() as prof:
        out = normalizer(x)
    assert [e.name for e in prof.events() if e.cpu_parent is None] == ["aten::empty", "aten::addcmul"]
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    else:
        assert out.stride() == torch.empty(out.shape).stride()
    m, s = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (mean, std))
    want = ((x.double() / 255 - m) / s).float()
    torch.testing.assert_close(out, want, rtol=0, atol=4 * torch.finfo(torch.float32).eps * want.abs().max().item())


def test_prefetched_loads_one_batch_ahead():
    from kdgraph.stream import prefetched

    calls = []

    def load(batch):
        calls.append(batch)
        return (torch.tensor([batch]),)

    batches = prefetched(iter(range(4)), load, torch.device("cpu"))
    assert next(batches)[0].item() == 0 and calls == [0, 1]  # batch 1 loaded before batch 0 is used
    assert [b[0].item() for b in batches] == [1, 2, 3] and calls == [0, 1, 2, 3]
    assert list(prefetched(iter([]), load, torch.device("cpu"))) == []


@pytest.mark.parametrize("workers", [0, 2])
def test_prefetched_batches_equal_the_batches_without(tmp_path, workers):
    """The prefetching path (on CUDA: copies and normalisation on a side stream) runs the same
    loop on the CPU: its batches are the plain loop's, from the start and resumed mid-epoch."""
    root = write_folder(tmp_path / "images", channels=3)
    ahead, plain = _stream(root, workers, channels=3), _stream(root, workers, channels=3)
    for loader in (ahead, plain):
        loader.normalizer = Normalizer((0.4, 0.5, 0.6), (0.2, 0.25, 0.3), torch.device("cpu"))
    plain.prefetch = False
    assert ahead.prefetch
    for epoch, start in ((0, 0), (1, 2)):
        a, b = list(ahead.epoch(epoch, start)), list(plain.epoch(epoch, start))
        assert len(a) == len(b) == len(ahead) - start
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xa.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ya, yb)

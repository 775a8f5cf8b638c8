import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdgraph import data
from kdgraph.data import DeviceLoader, build_loaders, class_balanced_subset, create_dataset
from kdgraph.errors import DataError
from kdgraph.spec import DataSpec


def spec(**kw):
    base = dict(
        dataset="digits",
        root=None,
        input_size=None,
        batch_size=32,
        test_batch_size=None,
        fraction=1.0,
        samples=64,
        num_classes=None,
        augment="auto",
    )
    base.update(kw)
    return DataSpec.model_construct(**base)  # unvalidated: the data code's own checks are tested


# ---------------------------------------------------------------- datasets


def test_digits_default():
    ds = create_dataset(spec(), seed=0)
    assert ds.input_size == (1, 8, 8) and ds.num_classes == 10 and ds.default_augment == "crop"
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.train_x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert ds.train_x.std().item() == pytest.approx(1.0, abs=1e-3)
    assert torch.bincount(ds.test_y).min() >= 35  # stratified: every class ~36 times
    assert "digits" in str(ds)


def test_digits_test_split_independent_of_seed():
    a, b = create_dataset(spec(), seed=0), create_dataset(spec(fraction=0.5), seed=7)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)


def test_resize_and_channels():
    ds = create_dataset(spec(input_size=(3, 16, 16)), seed=0)
    assert ds.train_x.shape[1:] == (3, 16, 16) and ds.input_size == (3, 16, 16)
    assert torch.equal(ds.train_x[:, 0], ds.train_x[:, 2])  # grey repeated
    with pytest.raises(DataError, match="channels"):
        create_dataset(spec(input_size=(2, 8, 8)), seed=0)


def test_fraction_class_balanced_and_seeded():
    full = create_dataset(spec(), seed=0)
    a = create_dataset(spec(fraction=0.1), seed=1)
    b = create_dataset(spec(fraction=0.1), seed=1)
    c = create_dataset(spec(fraction=0.1), seed=2)
    full_counts, counts = torch.bincount(full.train_y), torch.bincount(a.train_y)
    assert torch.equal(counts, torch.round(full_counts * 0.1).long())
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, c.train_x)
    tiny = class_balanced_subset(full.train_y, 1e-4, seed=0)
    assert torch.equal(torch.bincount(full.train_y[tiny]), torch.ones(10, dtype=torch.long))


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match=r"digits.*fashion-mnist.*imagefolder.*synthetic.*torchvision:NAME"):
        create_dataset(spec(dataset="cifar-1000"), seed=0)


def test_num_classes_mismatch():
    with pytest.raises(DataError, match="num_classes"):
        create_dataset(spec(num_classes=100), seed=0)


def test_synthetic():
    s = spec(dataset="synthetic", input_size=(3, 12, 10), samples=40, num_classes=5)
    a, b = create_dataset(s, seed=3), create_dataset(s, seed=3)
    assert a.train_x.shape == (40, 3, 12, 10) and a.test_x.shape == (10, 3, 12, 10)
    assert a.num_classes == 5 and a.train_y.max() < 5 and a.default_augment == "none"
    assert torch.equal(a.train_x, b.train_x)
    assert create_dataset(spec(dataset="synthetic"), seed=0).input_size == (3, 32, 32)


def test_register_dataset():
    def tiny(s, seed):
        x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
        return data.RawSplits(x, torch.tensor([0, 1]), x, torch.tensor([1, 0]), 2, "none")

    data.register_dataset("tiny-test", tiny, overwrite=True)
    try:
        with pytest.raises(ValueError, match="already registered"):
            data.register_dataset("tiny-test", tiny)
        assert create_dataset(spec(dataset="tiny-test"), seed=0).num_classes == 2
        # through the spec's validation too, as a user's YAML reaches it
        from kdgraph.errors import SpecError
        from kdgraph.spec import load_spec

        real = {"name": "r", "student": {"model": "module:kdgraph.zoo:resnet_tiny_student"},
                "data": {"dataset": "tiny-test", "input_size": [1, 4, 4]}, "schedule": {"method": "supervised"},
                "decompose": {"blocks": 1}}
        assert load_spec(real).data.dataset == "tiny-test"
    finally:
        data.DATASETS.unregister("tiny-test")
    with pytest.raises(SpecError, match="data.dataset"):
        load_spec(real)


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_fashion_mnist_idx_reader(tmp_path):
    nested = tmp_path / "some" / "dir"
    nested.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tr = rng.integers(0, 256, (20, 28, 28))
    te = rng.integers(0, 256, (10, 28, 28))
    _write_idx(nested / "train-images-idx3-ubyte", tr, gz=True)
    _write_idx(nested / "train-labels-idx1-ubyte", np.arange(20) % 10, gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", te, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10), gz=False)
    ds = create_dataset(spec(dataset="fashion-mnist", root=tmp_path), seed=0)
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    assert torch.equal(ds.test_y, torch.arange(10))
    raw = ds.test_x[3, 0] * ds.std[0] + ds.mean[0]
    torch.testing.assert_close(raw, torch.from_numpy(te[3]).float(), atol=1e-3, rtol=0)


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install -y dataset-fashion-mnist.*data\.root"):
        create_dataset(spec(dataset="fashion-mnist", root=tmp_path), seed=0)


@pytest.mark.skipif(not data.FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_installed():
    ds = create_dataset(spec(dataset="fashion-mnist", fraction=0.05), seed=0)
    assert ds.test_x.shape == (10000, 1, 28, 28) and len(ds.train_y) == 3000
    assert ds.num_classes == 10 and ds.default_augment == "crop+flip"


def test_imagefolder(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("val", 2)):
        for cls, value in (("cat", 50), ("dog", 200)):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((10, 12, 3), value + i, dtype=np.uint8)).save(folder / f"{i}.png")
    ds = create_dataset(spec(dataset="imagefolder", root=tmp_path), seed=0)
    assert ds.input_size == (3, 10, 12) and ds.num_classes == 2
    assert ds.train_x.shape == (6, 3, 10, 12) and ds.test_x.shape == (4, 3, 10, 12)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    small = create_dataset(spec(dataset="imagefolder", root=tmp_path, input_size=(1, 5, 6)), seed=0)
    assert small.train_x.shape == (6, 1, 5, 6)
    with pytest.raises(DataError, match="train"):
        create_dataset(spec(dataset="imagefolder", root=tmp_path / "nope"), seed=0)


def test_torchvision_missing(tmp_path):
    with pytest.raises(DataError, match="CIFAR10"):
        create_dataset(spec(dataset="torchvision:CIFAR10", root=tmp_path), seed=0)
    with pytest.raises(DataError, match="no dataset"):
        create_dataset(spec(dataset="torchvision:NotADataset", root=tmp_path), seed=0)


# ---------------------------------------------------------------- loader


def _xy(n=23, c=2, h=8, w=8):
    x = torch.arange(n * c * h * w, dtype=torch.float32).reshape(n, c, h, w)
    return x, torch.arange(n)


def test_loader_covers_every_sample_once():
    x, y = _xy()
    loader = DeviceLoader(x, y, 5, shuffle=True, seed=1)
    assert len(loader) == 5
    ys = torch.cat([yb for _, yb in loader.epoch(0)])
    assert sorted(ys.tolist()) == list(range(23))
    assert len(DeviceLoader(x, y, 5, shuffle=True, drop_last=True)) == 4
    test = DeviceLoader(x, y, 10, shuffle=False)
    assert torch.cat([yb for _, yb in test]).tolist() == list(range(23))


def test_loader_order_pure_function_of_seed_epoch_and_resumable():
    x, y = _xy()
    mk = lambda seed: DeviceLoader(x, y, 4, shuffle=True, augment="crop+flip", seed=seed, drop_last=True)  # noqa: E731
    a, b = mk(3), mk(3)
    run = [(xb.clone(), yb.clone()) for xb, yb in a.epoch(2)]
    again = list(b.epoch(2))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(run, again))
    resumed = list(b.epoch(2, start_step=3))
    assert len(resumed) == len(run) - 3
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(run[3:], resumed))
    other_epoch = torch.cat([yb for _, yb in a.epoch(3)])
    assert not torch.equal(torch.cat([yb for _, yb in run]), other_epoch)
    assert not torch.equal(torch.cat([yb for _, yb in mk(4).epoch(2)]), torch.cat([yb for _, yb in run]))


def test_sharding_equal_batches_and_disjoint():
    x, y = _xy(n=22)
    shards = [DeviceLoader(x, y, 3, shuffle=True, seed=0, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 3  # ceil(22/3)=8 per rank
    seen = [torch.cat([yb for _, yb in s.epoch(1)]) for s in shards]
    assert all(len(s) == 8 for s in seen)
    everything = torch.cat(seen)
    assert set(everything.tolist()) == set(range(22)) and len(everything) == 24  # 2 wrapped duplicates
    dropped = [DeviceLoader(x, y, 3, shuffle=True, seed=0, rank=r, world_size=3, drop_last=True) for r in range(3)]
    ys = torch.cat([yb for s in dropped for _, yb in s.epoch(1)])
    assert len(ys) == 18 and len(set(ys.tolist())) == 18


def _reference_crop(xb, offsets, flips, pad, fill):
    out = []
    for i in range(len(xb)):  # per-sample loop: the obvious implementation, as the oracle
        img = F.pad(xb[i] - fill[0], (pad, pad, pad, pad)) + fill[0]
        oy, ox = offsets[i].tolist()
        crop = img[:, oy : oy + xb.shape[2], ox : ox + xb.shape[3]]
        out.append(crop.flip(-1) if flips is not None and flips[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("augment", ["crop", "crop+flip"])
def test_crop_flip_matches_per_sample_reference(augment):
    x, y = _xy(n=16, c=2, h=8, w=6)
    fill = torch.tensor([-1.5, 2.0])
    loader = DeviceLoader(x, y, 16, shuffle=True, augment=augment, seed=5, pad_value=fill)
    order, offsets, flips = loader.epoch_plan(0)
    (xb, yb), = list(loader.epoch(0))
    assert torch.equal(yb, order)
    want = _reference_crop(x[order], offsets, flips, loader.pad, fill[None, :, None, None])
    torch.testing.assert_close(xb, want)
    assert offsets.max() <= 2 and (offsets.max() > 0)  # pad = max(1, 8 // 8) = 1
    if augment == "crop+flip":
        assert 0 < flips.sum() < 16


def test_crop_offset_centre_is_identity():
    x, y = _xy(n=4, h=16, w=16)
    loader = DeviceLoader(x, y, 4, shuffle=False, augment="crop")
    centre = torch.full((4, 2), loader.pad)
    torch.testing.assert_close(loader.crop_flip(x, centre, None), x)


def test_bad_augment():
    x, y = _xy()
    with pytest.raises(DataError, match="crop\\+flip"):
        DeviceLoader(x, y, 4, shuffle=True, augment="mixup")


def test_build_loaders_digits():
    train, test, ds = build_loaders(spec(batch_size=64, test_batch_size=100), seed=0, device="cpu")
    assert train.augment == "crop" and test.augment == "none" and not test.shuffle
    assert len(train) == 1437 // 64 and len(test) == 4
    xb, yb = next(train.epoch(0))
    assert xb.shape == (64, 1, 8, 8) and yb.dtype == torch.int64
    # padding is the normalised value of a black pixel (the digits' background)
    assert train.fill.flatten().item() == pytest.approx(-ds.mean[0] / ds.std[0])
    train2, _, _ = build_loaders(spec(augment="none", fraction=0.01, batch_size=64), seed=0, device="cpu")
    assert train2.augment == "none" and len(train2) == 1 and not train2.drop_last

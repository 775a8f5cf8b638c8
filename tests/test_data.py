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
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64  # raw 0..16, normalised per batch
    assert int(ds.train_x.max()) == 16
    normalised = ds.normalize(ds.train_x)
    assert normalised.dtype == torch.float32
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert normalised.std().item() == pytest.approx(1.0, abs=1e-3)
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


def test_validation_split_class_balanced_disjoint_and_seeded():
    full = create_dataset(spec(), seed=0)
    a = create_dataset(spec(val_fraction=0.1), seed=1)
    b = create_dataset(spec(val_fraction=0.1), seed=1)
    c = create_dataset(spec(val_fraction=0.1), seed=2)
    counts = torch.bincount(full.train_y)
    # independent truth: every class c gives round(0.1 * n_c) samples, the rest stay for training
    assert torch.equal(torch.bincount(a.val_y), torch.round(counts * 0.1).long())
    assert torch.equal(torch.bincount(a.train_y), counts - torch.round(counts * 0.1).long())
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_x, b.train_x)  # deterministic in the seed
    assert not torch.equal(a.val_x, c.val_x)
    assert torch.equal(a.test_x, full.test_x)  # the test split is untouched
    # disjoint and covering: the two splits are the full training split, each image once
    rows = lambda x: sorted(map(bytes, x.flatten(1).numpy()))  # noqa: E731
    assert rows(torch.cat([a.train_x, a.val_x])) == rows(full.train_x)
    rest, held = data.validation_split(full.train_y, 0.1, seed=1)
    assert not set(rest.tolist()) & set(held.tolist()) and len(rest) + len(held) == len(full.train_y)
    assert torch.equal(full.train_x[held], a.val_x)
    assert a.mean == full.mean and a.std == full.std  # normalised as every run of the dataset is
    assert full.val_x is None and full.val_y is None  # val_fraction 0: no validation split


def test_validation_split_before_fraction():
    full = create_dataset(spec(), seed=0)
    both = create_dataset(spec(val_fraction=0.2, fraction=0.5), seed=3)
    held = torch.round(torch.bincount(full.train_y) * 0.2).long()
    assert torch.equal(torch.bincount(both.val_y), held)
    assert torch.equal(torch.bincount(both.train_y), torch.round((torch.bincount(full.train_y) - held) * 0.5).long())
    assert torch.equal(both.val_x, create_dataset(spec(val_fraction=0.2), seed=3).val_x)  # fraction does not move it


def test_validation_split_edges():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    rest, held = data.validation_split(labels, 0.01, seed=0)  # at least one of every class, one left to train
    assert torch.equal(torch.bincount(labels[held]), torch.ones(3, dtype=torch.long))
    rest, held = data.validation_split(labels, 0.5, seed=0)
    assert torch.bincount(labels[held]).tolist() == [2, 1, 2] and torch.bincount(labels[rest]).min() >= 1
    with pytest.raises(DataError, match="class 1 has 1 training sample"):
        data.validation_split(torch.tensor([0, 0, 1]), 0.3, seed=0)
    masks = torch.zeros(20, 4, 4, dtype=torch.long)  # per-pixel labels: a share of all samples
    rest, held = data.validation_split(masks, 0.25, seed=0)
    assert len(held) == 5 and len(rest) == 15


def test_build_loaders_digits_validation_loader():
    from types import SimpleNamespace

    from kdgraph.ir import DataPlan

    s = SimpleNamespace(data=spec(val_fraction=0.1, batch_size=64), seed=4)
    plan = DataPlan("digits", "memory", "digits is held in memory", (1, 8, 8))
    d = data.build_data(s, plan, torch.device("cpu"), SimpleNamespace(rank=0, world_size=1))
    ds = create_dataset(spec(val_fraction=0.1), seed=4)
    assert d.eval_split == "val" and d.eval_loader is d.val and not d.val.shuffle and d.val.augment == "none"
    assert torch.equal(torch.cat([y for _, y in d.val.epoch(0)]), ds.val_y)
    assert len(d.test.y) == 360 and len(d.train.y) == len(ds.train_y)
    plain = data.build_data(SimpleNamespace(data=spec(batch_size=64), seed=4), plan, torch.device("cpu"),
                            SimpleNamespace(rank=0, world_size=1))
    assert plain.val is None and plain.eval_split == "test" and plain.eval_loader is plain.test


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
    assert ds.test_x.dtype == torch.uint8 and torch.equal(ds.test_x[3, 0], torch.from_numpy(te[3]).to(torch.uint8))


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


def test_imagefolder_val_and_test_folders(tmp_path):
    """A root holding val/ and test/: with a validation split asked for, val/ is it (nothing is
    held out of train/) and test/ is the test split; without, val/ is evaluated as before."""
    from PIL import Image

    for split, n, value in (("train", 4, 10), ("val", 2, 100), ("test", 3, 200)):
        for k, cls in enumerate(("cat", "dog")):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = np.full((6, 6), value + 10 * k + i, dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    kw = dict(dataset="imagefolder", root=tmp_path, input_size=(1, 6, 6))
    plain = create_dataset(spec(**kw), seed=0)
    assert plain.val_x is None and sorted(plain.test_x[:, 0, 0, 0].tolist()) == [100, 101, 110, 111]
    ds = create_dataset(spec(**kw, val_fraction=0.25), seed=0)
    assert sorted(ds.val_x[:, 0, 0, 0].tolist()) == [100, 101, 110, 111] and ds.val_y.tolist() == [0, 0, 1, 1]
    assert sorted(ds.test_x[:, 0, 0, 0].tolist()) == [200, 201, 202, 210, 211, 212]
    assert len(ds.train_y) == 8  # all of train/
    only_val = tmp_path / "two"
    only_val.mkdir()
    for split in ("train", "val"):
        (tmp_path / split).rename(only_val / split)
    held = create_dataset(spec(dataset="imagefolder", root=only_val, input_size=(1, 6, 6), val_fraction=0.25), seed=0)
    assert len(held.val_y) == 2 and len(held.train_y) == 6  # held out of train/: val/ is the test split
    assert sorted(held.test_x[:, 0, 0, 0].tolist()) == [100, 101, 110, 111]


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
    """Crops of normalised images ``xb`` from a canvas of ``fill`` (C values: the normalised
    black) at ``offsets``, flipped where ``flips``."""
    out = []
    n, c, h, w = xb.shape
    for i in range(n):  # per-sample loop: the obvious implementation, as the oracle
        canvas = fill.reshape(c, 1, 1).repeat(1, h + 2 * pad, w + 2 * pad)
        canvas[:, pad : pad + h, pad : pad + w] = xb[i]
        oy, ox = offsets[i].tolist()
        crop = canvas[:, oy : oy + h, ox : ox + w]
        out.append(crop.flip(-1) if flips is not None and flips[i] else crop)
    return torch.stack(out)


def _normalised_the_float_way(x, mean, std):
    """The float path's normalisation: float32 images, minus mean, divided by std (float32)."""
    m, s = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (mean, std))
    return (x.float() - m) / s


@pytest.mark.parametrize("augment", ["crop", "crop+flip"])
def test_crop_flip_matches_per_sample_reference(augment):
    x, y = _xy(n=16, c=2, h=8, w=6)
    norm = ((3.0, 40.0), (2.0, 0.5))
    loader = DeviceLoader(x, y, 16, shuffle=True, augment=augment, seed=5, norm=norm)
    order, offsets, flips = loader.epoch_plan(0)
    (xb, yb), = list(loader.epoch(0))
    assert torch.equal(yb, order)
    black = _normalised_the_float_way(torch.zeros(1, 2, 1, 1), *norm).flatten()
    want = _reference_crop(_normalised_the_float_way(x[order], *norm), offsets, flips, loader.pad, black)
    assert torch.equal(xb, want)
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
    corner = train.normalize(train.crop_flip(ds.train_x[:1], torch.zeros(1, 2, dtype=torch.long), None))
    assert corner[0, 0, 0, 0].item() == pytest.approx(-ds.mean[0] / ds.std[0])
    train2, _, _ = build_loaders(spec(augment="none", fraction=0.01, batch_size=64), seed=0, device="cpu")
    assert train2.augment == "none" and len(train2) == 1 and not train2.drop_last


# ------------------------------------------------- integer pixels, normalised per batch


def test_integer_pixels_kept_in_the_smallest_exact_type(tmp_path):
    """uint8 where the pixels are integers (digits' 0..16 too); int16 for wider integers; float32
    for float sources and for pixels resampled to another size (no longer integers)."""
    assert create_dataset(spec(), seed=0).train_x.dtype == torch.uint8
    assert create_dataset(spec(input_size=(3, 8, 8)), seed=0).train_x.dtype == torch.uint8  # repeated
    assert create_dataset(spec(input_size=(1, 12, 12), resize="pad"), seed=0).train_x.dtype == torch.uint8
    assert create_dataset(spec(input_size=(1, 12, 12), resize="resample"), seed=0).train_x.dtype == torch.float32
    assert create_dataset(spec(dataset="synthetic", input_size=(3, 4, 4)), seed=0).train_x.dtype == torch.float32

    def wide(s, seed):
        x = torch.arange(4 * 16, dtype=torch.int64).reshape(4, 1, 4, 4) * 20 - 100  # -100..1160
        return data.RawSplits(x, torch.tensor([0, 1, 0, 1]), x, torch.tensor([1, 0, 1, 0]), 2, "none")

    data.register_dataset("wide-test", wide, overwrite=True)
    try:
        ds = create_dataset(spec(dataset="wide-test"), seed=0)
    finally:
        data.DATASETS.unregister("wide-test")
    assert ds.train_x.dtype == torch.int16 and int(ds.train_x.min()) == -100 and int(ds.train_x.max()) == 1160
    mean, std = _exact_stats(wide(None, 0)[0].numpy())
    assert ds.mean == mean and ds.std == std


def _exact_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and Bessel-corrected std of integer images, computed exactly, rounded to float32."""
    from fractions import Fraction

    means, stds = [], []
    for ch in range(x.shape[1]):
        v = x[:, ch].astype(np.int64).ravel()
        n, s1, s2 = len(v), int(v.sum()), int((v * v).sum())
        means.append(float(Fraction(s1, n)))
        stds.append(float(np.sqrt(float(Fraction(n * s2 - s1 * s1, n * (n - 1))))))
    return tuple(np.float32(means).tolist()), tuple(np.float32(stds).tolist())


def _float_path_batches(raw_x, loader, norm, epoch, steps):
    """The float path, computed independently: float32 images minus mean, divided by std, then
    the loader's draws (order, crop offsets, flips) cut from a canvas of normalised black."""
    order, offsets, flips = loader.epoch_plan(epoch)
    black = _normalised_the_float_way(torch.zeros(1, raw_x.shape[1], 1, 1), *norm).flatten()
    bs = loader.batch_size
    for step in steps:
        sl = slice(step * bs, min((step + 1) * bs, loader.samples_per_rank))
        xb = _normalised_the_float_way(raw_x[order[sl]].float(), *norm)
        if offsets is not None:
            xb = _reference_crop(xb, offsets[sl], None if flips is None else flips[sl], loader.pad, black)
        yield xb


def _the_old_deviceloader_crop(xb, offsets, flips, pad, norm):
    """The float path's DeviceLoader arithmetic: normalised batch shifted by the fill value
    (-mean/std, from float64), zero-padded, cut, shifted back: one more rounding per pixel."""
    fill = torch.tensor([-m / s for m, s in zip(*norm)])[None, :, None, None]
    padded = F.pad(xb - fill, (pad, pad, pad, pad))
    b, c, h, w = xb.shape
    rows = offsets[:, 0:1] + torch.arange(h)
    cols = offsets[:, 1:2] + torch.arange(w)
    if flips is not None:
        cols = torch.where(flips[:, None], offsets[:, 1:2] + (w - 1 - torch.arange(w)), cols)
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]] + fill


def _imagefolder(root: Path, side: int = 12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(3)
    for split, n in (("train", 14), ("val", 5)):
        for cls in ("a", "b", "c"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def _float_source(name: str, tmp_path: Path):
    """(data spec, train images and test images as the float path read them, float32 N x C x H x W)."""
    from PIL import Image

    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        tr, te = train_test_split(d.images.astype(np.float32)[:, None], test_size=0.2, random_state=0,
                                  stratify=d.target)
        return spec(batch_size=64), torch.from_numpy(tr), torch.from_numpy(te)
    if name == "fashion-mnist":
        if not data.FASHION_MNIST_ROOT.is_dir():
            pytest.skip("dataset-fashion-mnist not installed")
        images = [data.read_idx(str(data.FASHION_MNIST_ROOT / f"{s}-images-idx3-ubyte.gz")) for s in ("train", "t10k")]
        return (spec(dataset="fashion-mnist", batch_size=256),
                *(torch.from_numpy(a.astype(np.float32))[:, None] for a in images))
    root = _imagefolder(tmp_path / "folder")
    splits = []
    for split in ("train", "val"):
        files = sorted((root / split).rglob("*.png"))
        splits.append(torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)
                                                 .transpose(2, 0, 1) for f in files])))
    return spec(dataset="imagefolder", root=root, batch_size=8), *splits


@pytest.mark.parametrize("name", ["digits", "fashion-mnist", "imagefolder"])
def test_uint8_batches_equal_the_float_path_bit_for_bit(name, tmp_path):
    """Held as uint8, normalised after the crop and flip: every value of a batch is the one the
    float path gives (float32 image - mean, / std, then cropped with normalised-black padding),
    bit for bit: ``torch.sub`` reads uint8 as float32 exactly and the two operations are the
    same, and a padded pixel is raw 0 normalised. The statistics are the exact ones, rounded
    once (the float path's float32 reduction agrees to 1e-6); the old DeviceLoader's shift by
    the fill value and back cost one more rounding, so it agrees to fp32 rounding only."""
    data_spec, train_f32, test_f32 = _float_source(name, tmp_path)
    train, test, ds = build_loaders(data_spec, seed=3, device="cpu")
    assert ds.train_x.dtype == ds.test_x.dtype == torch.uint8
    assert torch.equal(ds.train_x.float(), train_f32) and torch.equal(ds.test_x.float(), test_f32)
    assert (ds.mean, ds.std) == _exact_stats(ds.train_x.numpy())
    old_mean, old_std = train_f32.mean(dim=(0, 2, 3)), train_f32.std(dim=(0, 2, 3))
    torch.testing.assert_close(torch.tensor(ds.mean), old_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(ds.std), old_std, rtol=1e-6, atol=0)

    steps = range(len(train)) if len(train) < 50 else (0, 1, len(train) - 1)
    got = list(train.epoch(2))
    assert train.augment != "none"
    for step, want in zip(steps, _float_path_batches(train_f32, train, ds.norm, 2, steps)):
        assert got[step][0].dtype == torch.float32 and torch.equal(got[step][0], want), step
    order, offsets, flips = train.epoch_plan(2)
    bs = train.batch_size
    old = _the_old_deviceloader_crop(_normalised_the_float_way(train_f32[order[:bs]], *ds.norm), offsets[:bs],
                                     None if flips is None else flips[:bs], train.pad, ds.norm)
    torch.testing.assert_close(got[0][0], old, rtol=0, atol=2 * torch.finfo(torch.float32).eps * old.abs().max().item())
    for (xb, _), want in zip(test.epoch(0), _float_path_batches(test_f32, test, ds.norm, 0, range(len(test)))):
        assert torch.equal(xb, want)


def test_idx_header_that_disagrees_with_the_file(tmp_path):
    """read_idx decodes into an array of the header's size: a header claiming more than the
    file can hold is refused before allocating it; fewer or more values than it says are errors."""
    header = struct.pack(">BBBB", 0, 0, 8, 2)
    (tmp_path / "huge").write_bytes(header + struct.pack(">II", 60000, 60000) + bytes(10))
    with pytest.raises(DataError, match="too small to hold it"):
        data.read_idx(str(tmp_path / "huge"))
    (tmp_path / "short").write_bytes(header + struct.pack(">II", 2, 3) + bytes(5))
    with pytest.raises(DataError, match=r"header says \(2, 3\) \(6 values\), the file holds 5"):
        data.read_idx(str(tmp_path / "short"))
    (tmp_path / "long").write_bytes(header + struct.pack(">II", 2, 3) + bytes(7))
    with pytest.raises(DataError, match="the file holds more"):
        data.read_idx(str(tmp_path / "long"))
    with gzip.open(tmp_path / "ok.gz", "wb") as f:
        f.write(header + struct.pack(">II", 2, 3) + bytes(range(6)))
    arr = data.read_idx(str(tmp_path / "ok.gz"))
    assert arr.shape == (2, 3) and arr.dtype == np.uint8 and arr.flags.writeable
    assert arr.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_batches_come_in_the_steps_layout():
    """channels_last: the normalisation writes the batch in that layout (the step's
    ``contiguous(channels_last)`` is then no copy); the values are the NCHW batch's."""
    x = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(12)
    norm = ((100.0, 120.0, 140.0), (50.0, 60.0, 70.0))
    plain, last = (DeviceLoader(x, y, 5, shuffle=True, augment="crop+flip", seed=2, norm=norm, channels_last=cl)
                   for cl in (False, True))
    for (xa, _), (xb, _) in zip(plain.epoch(1), last.epoch(1)):
        assert xa.stride() == torch.empty(xa.shape).stride()
        assert xb.is_contiguous(memory_format=torch.channels_last) and xb.contiguous(
            memory_format=torch.channels_last).data_ptr() == xb.data_ptr()
        assert torch.equal(xa, xb)

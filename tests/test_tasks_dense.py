"""kdgraph.tasks.dense: the dense task's scores, head loss and summary.

Independent truths: confusion matrices and IoUs counted by hand with numpy over the labelled
pixels; the head loss's terms against kdgraph.segmentation.losses called directly; pixels
labelled ignore_index changed arbitrarily in logits (scores) and in both models' logits (the
plan's head loss) while every number stays the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdgraph.compiler import compile_spec
from kdgraph.compiler.blockgraph import resolved_loss
from kdgraph.errors import KDGraphError
from kdgraph.losses import create_loss
from kdgraph.segmentation.losses import ChannelWiseDistillation
from kdgraph.spec import load_spec
from kdgraph.tasks.create import task_class
from kdgraph.tasks.dense import Dense, dense_scores

FASHION = Path("/usr/share/datasets/fashion-mnist")
CPU = torch.device("cpu")


class _Loader:
    def __init__(self, batches):
        self.batches = batches

    def epoch(self, e, start=0):
        return iter(self.batches)


def _case(seed: int, c: int = 4, h: int = 6, w: int = 8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, c, h, w, generator=g)
    y = torch.randint(0, c, (3, h, w), generator=g)
    y[torch.rand(3, h, w, generator=g) < 0.3] = 255
    return logits, y


def _numpy_scores(logits: np.ndarray, y: np.ndarray, c: int) -> dict:
    pred = logits.argmax(1)
    keep = y != 255
    m = np.zeros((c, c))
    for t, p in zip(y[keep], pred[keep]):
        m[t, p] += 1
    inter, union = np.diag(m), m.sum(0) + m.sum(1) - np.diag(m)
    iou = [inter[k] / union[k] for k in range(c) if union[k] > 0]
    order = np.argsort(-logits, axis=1)[:, :5]  # (B, 5, H, W)
    top5 = (order == y[:, None]).any(1)[keep].mean()
    return {"miou": 100 * np.mean(iou), "pixel_acc": 100 * inter.sum() / m.sum(), "top5": 100 * top5,
            "iou": [100 * inter[k] / union[k] if union[k] > 0 else None for k in range(c)],
            "class_acc": [100 * inter[k] / m[k].sum() if m[k].sum() > 0 else None for k in range(c)]}


def test_scores_are_counted_over_the_labelled_pixels():
    logits, y = _case(0, c=7)
    got = dense_scores(lambda x: logits, _Loader([(torch.zeros(3), y)]), CPU)
    want = _numpy_scores(logits.numpy(), y.numpy(), 7)
    for key in ("miou", "pixel_acc", "top5"):
        assert got[key] == pytest.approx(want[key]), key
    assert got["top1"] == got["pixel_acc"]
    assert got["iou"] == pytest.approx(want["iou"]) and got["class_acc"] == pytest.approx(want["class_acc"])


def test_logits_at_ignored_pixels_change_no_score():
    logits, y = _case(1)
    other = logits.clone()
    ignored = (y == 255).unsqueeze(1).expand_as(other)
    other[ignored] = 1e3 * torch.randn(int(ignored.sum()))
    a = dense_scores(lambda x: logits, _Loader([(torch.zeros(3), y)]), CPU)
    b = dense_scores(lambda x: other, _Loader([(torch.zeros(3), y)]), CPU)
    assert a == b
    # another ignore_index: 255 is then a label out of range, the pixels labelled 0 are skipped
    y0 = torch.where(y == 255, 0, y)
    c = dense_scores(lambda x: logits, _Loader([(torch.zeros(3), y0)]), CPU, ignore_index=0)
    keep = y0 != 0
    assert c["pixel_acc"] == pytest.approx(100 * float((logits.argmax(1) == y0)[keep].float().mean()))


def test_logits_of_another_stride_and_several_heads_are_scored_on_the_label_grid():
    logits, y = _case(2, h=12, w=16)
    small = torch.randn(3, 4, 6, 8, generator=torch.Generator().manual_seed(5))
    up = F.interpolate(small, size=(12, 16), mode="bilinear", align_corners=False)
    a = dense_scores(lambda x: (small, logits), _Loader([(torch.zeros(3), y)]), CPU)  # out first, aux second
    b = dense_scores(lambda x: up, _Loader([(torch.zeros(3), y)]), CPU)
    assert a == b


def test_batches_accumulate_as_one_confusion_matrix():
    (l1, y1), (l2, y2) = _case(3), _case(4)
    it = iter([l1, l2])
    got = dense_scores(lambda x: next(it), _Loader([(torch.zeros(3), y1), (torch.zeros(3), y2)]), CPU)
    want = _numpy_scores(torch.cat([l1, l2]).numpy(), torch.cat([y1, y2]).numpy(), 4)
    assert got["miou"] == pytest.approx(want["miou"]) and got["pixel_acc"] == pytest.approx(want["pixel_acc"])


def test_the_task_is_best_by_miou_and_reports_each_class():
    cls = task_class("dense")
    assert cls is Dense and cls.best_metric == "miou" and {"miou", "pixel_acc"} <= set(cls.metrics)

    class Run:
        test_acc = None
        student_acc = {"miou": 50.0, "iou": [10.0, None], "class_acc": [20.0, None]}
        teacher_acc = {"miou": 60.0, "iou": [30.0, 40.0], "class_acc": [50.0, 60.0]}

    got = object.__new__(cls).reports(Run())
    assert got == {"per_class": {"student": {"iou": [10.0, None], "pixel_acc": [20.0, None]},
                                 "teacher": {"iou": [30.0, 40.0], "pixel_acc": [50.0, 60.0]}}}
    assert "50.00" in cls.headline({"student_miou": 50.0, "student_pixel_acc": 70.0})


# ------------------------------------------------------------------ the plan: head loss, levels

def _unet_spec(tmp_path, *overrides):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        "name: dense\ntask: dense\n"
        "teacher: {model: 'module:kdgraph.zoo:unet_tiny_teacher', kwargs: {num_classes: 5, in_chans: 1}}\n"
        "student: {model: 'module:kdgraph.zoo:unet_tiny_student', kwargs: {num_classes: 5, in_chans: 1}}\n"
        f"data: {{dataset: synthetic, input_size: [1, 16, 16]}}\noutput: {tmp_path / 'out'}\n")
    return load_spec(spec_file, list(overrides))


def _head(compiled):
    return compiled.graph.nodes["head_loss"]


def test_the_spec_chooses_the_head_loss_and_ignore_index_defaults_to_255(tmp_path):
    compiled = compile_spec(_unet_spec(tmp_path, "schedule.method=kd", "loss.dense=cwd", "loss.kl_weight=5"),
                            allow_missing_weights=True)
    head = _head(compiled)
    assert head["entry"] == "cwd" and head["params"]["ignore_index"] == 255 and head["params"]["weight"] == 5.0
    compiled = compile_spec(_unet_spec(tmp_path, "schedule.method=kd", "loss.ignore_index=7"),
                            allow_missing_weights=True)
    head = _head(compiled)
    assert head["entry"] == "pixel_kl" and head["params"]["ignore_index"] == 7
    assert resolved_loss({"ignore_index": None}, "causal_lm")["ignore_index"] == -100


def test_the_plans_head_loss_ignores_pixels_labelled_ignore_index(tmp_path):
    """The plan's own head loss (entry and params as compiled): both models' logits changed at the
    ignored pixels, every term and the student's gradient elsewhere are the same."""
    compiled = compile_spec(_unet_spec(tmp_path, "schedule.method=kd", "loss.dense=cwd"), allow_missing_weights=True)
    head = _head(compiled)
    loss = create_loss(head["entry"], head["params"])
    assert isinstance(loss, ChannelWiseDistillation)
    s, y = _case(6, c=5)
    t = torch.randn_like(s)
    s2, t2 = s.clone(), t.clone()
    ignored = (y == 255).unsqueeze(1).expand_as(s)
    s2[ignored], t2[ignored] = 40 * torch.randn(int(ignored.sum())), -30.0
    s.requires_grad_(True)
    s2.requires_grad_(True)
    a, b = loss(s, y, t), loss(s2, y, t2)
    assert set(a) == {"ce", "cwd"}
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-6, abs=1e-7)
    sum(a.values()).backward()
    sum(b.values()).backward()
    torch.testing.assert_close(s.grad[~ignored], s2.grad[~ignored])


def test_feature_weights_weigh_each_level_and_a_wrong_count_is_refused(tmp_path):
    compiled = compile_spec(_unet_spec(tmp_path, "schedule.method=kd+mse", "loss.feature=pkd", "decompose.blocks=3",
                                       "loss.feature_weights=[0.5, 2]"), allow_missing_weights=True)
    g = compiled.graph
    assert g.nodes["pkd1"]["params"] == {"weight": 0.5} and g.nodes["pkd2"]["params"] == {"weight": 2.0}
    with pytest.raises(KDGraphError, match="feature_weights has 1 weights for 2 inner block ends"):
        compile_spec(_unet_spec(tmp_path, "schedule.method=kd+mse", "loss.feature=pkd", "decompose.blocks=3",
                                "loss.feature_weights=[1]"), allow_missing_weights=True)


# ------------------------------------------------------------------ a run end to end

@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST is not installed")
def test_a_dense_run_summarises_miou_per_class_and_best_by_miou(tmp_path):
    from kdgraph.runtime.loop import train

    spec = load_spec(Path(__file__).resolve().parents[1] / "bench" / "seg-evidence-teacher.yaml",
                     ["data.fraction=0.01",
                      "schedule.epochs=1", f"output={tmp_path / 'run'}", "runtime.log_every=1000"])
    summary = train(spec, quiet=True)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["task"] == "dense" and saved["best_miou"] == summary["student_miou"]
    per_class = saved["per_class"]["student"]
    assert len(per_class["iou"]) == len(per_class["pixel_acc"]) == 11
    seen = [v for v in per_class["iou"] if v is not None]
    assert saved["student_miou"] == pytest.approx(sum(seen) / len(seen))
    assert saved["student_pixel_acc"] == saved["student_top1"]


# ------------------------------------------------------------------ an image + mask folder end to end

def _write_voc_folder(root: Path, n_train: int = 4, n_val: int = 2, h: int = 40, w: int = 48) -> None:
    """A VOC-layout folder of 3 classes: blocks of class 0..2 whose colour is the class, a 4-px
    ignored (255) border on the left of every mask."""
    from PIL import Image

    g = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    names = [f"img_{i}" for i in range(n_train + n_val)]
    for name in names:
        mask = np.kron(g.integers(0, 3, size=(h // 8, w // 8)), np.ones((8, 8), np.int64)).astype(np.uint8)
        colour = np.array([[30, 30, 200], [200, 40, 40], [40, 200, 60]], np.uint8)[mask]
        noisy = np.clip(colour + g.integers(-20, 21, size=colour.shape), 0, 255).astype(np.uint8)
        mask[:, :4] = 255
        Image.fromarray(noisy).save(root / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(mask, "L").save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(names[n_train:]) + "\n")


def _voc_spec(tmp_path: Path) -> Path:
    path = tmp_path / "voc.yaml"
    path.write_text(
        "name: voc-tiny\nseed: 0\ntask: dense\n"
        "teacher: {model: 'torchvision:lraspp_mobilenet_v3_large', kwargs: {num_classes: 3}}\n"
        "student: {model: 'torchvision:lraspp_mobilenet_v3_large', kwargs: {num_classes: 3}}\n"
        f"data: {{dataset: voc, root: {tmp_path / 'voc'}, input_size: [3, 64, 64], batch_size: 2}}\n"
        "decompose: {blocks: 1}\nschedule: {method: kd, epochs: 1}\nloss: {dense: cwd, kl_weight: 5}\n"
        "optim: {name: sgd, lr: 0.01, momentum: 0.9}\n"
        "runtime: {device: cpu, num_threads: 1, num_workers: 0, log_every: 1000}\n"
        f"output: {tmp_path / 'run'}\n")
    return path


def _numpy_miou(pred: np.ndarray, y: np.ndarray, c: int) -> float:
    keep = y != 255
    m = np.zeros((c, c))
    np.add.at(m, (y[keep], pred[keep]), 1)
    inter, union = np.diag(m), m.sum(0) + m.sum(1) - np.diag(m)
    return 100 * float(np.mean([inter[k] / union[k] for k in range(c) if union[k] > 0]))


def test_a_voc_folder_plans_trains_scores_and_ships_in_torchvisions_layout(tmp_path):
    """`kdgraph plan` lists the folder's splits; `kdgraph train` runs an LRASPP pair one epoch on it;
    the summary's mIoU is the plain-torchvision export's, counted with numpy over the labelled
    pixels of the val images (read, resized and normalised here); the export's logits are the
    trained student's, bit for bit; `kdgraph eval` reads the export folder back."""
    import torchvision
    from PIL import Image
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from kdgraph.cli.main import app
    from kdgraph.runtime.commands import evaluate_spec, export_spec
    from kdgraph.runtime.loop import train
    from kdgraph.segmentation.losses import resize_to
    from kdgraph.segmentation.models import create_segmentation_model

    _write_voc_folder(tmp_path / "voc")
    path = _voc_spec(tmp_path)
    res = CliRunner().invoke(app, ["plan", str(path), "--format", "json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)["data"]
    assert (plan["dataset"], plan["loader"], plan["train_images"], plan["test_images"]) == ("voc", "stream", 4, 2)
    assert plan["reason"].startswith("voc: 4 train / 2 val image + mask pairs")
    torch.manual_seed(0)
    summary = train(load_spec(path), quiet=True)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["task"] == "dense" and len(saved["per_class"]["student"]["iou"]) == 3
    assert summary["student_miou"] == saved["student_miou"] is not None

    out = tmp_path / "export"
    shipped = export_spec(load_spec(path), out)
    assert shipped["format"] == "torchvision" and sorted(p.name for p in out.iterdir()) == \
        ["config.json", "constructor.json", "model.safetensors"]
    ctor = json.loads((out / "constructor.json").read_text())
    card = json.loads((out / "config.json").read_text())["_kdgraph"]
    assert card["resize"] == "resize to 64x64 (bilinear, antialiased), no crop"  # as the scores below read the images
    net = torchvision.models.get_model(ctor["name"], weights=None, **ctor["kwargs"]).eval()
    net.load_state_dict(load_file(str(out / "model.safetensors")))
    student = create_segmentation_model("lraspp_mobilenet_v3_large", {"num_classes": 3}).eval()
    student.load_state_dict(load_file(str(tmp_path / "run" / "student.safetensors")))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(net(x)["out"], resize_to(student(x), (64, 64)))

    mean, std = (np.array(saved["preprocessing"][k], np.float32).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    images, masks = [], []
    for name in ("img_4", "img_5"):
        pixels = np.asarray(Image.open(tmp_path / "voc" / "JPEGImages" / f"{name}.jpg").convert("RGB"), np.float32)
        images.append(F.interpolate(torch.from_numpy(pixels).permute(2, 0, 1)[None], size=(64, 64), mode="bilinear",
                                    align_corners=False, antialias=True)[0].numpy())
        masks.append(np.asarray(Image.open(tmp_path / "voc" / "SegmentationClass" / f"{name}.png"), np.int64))
    y = F.interpolate(torch.from_numpy(np.stack(masks))[:, None].float(), size=(64, 64), mode="nearest-exact")
    y = y[:, 0].long().numpy()
    with torch.no_grad():
        pred = net(torch.from_numpy((np.stack(images) / 255.0 - mean) / std))["out"].argmax(1).numpy()
    assert saved["student_miou"] == pytest.approx(_numpy_miou(pred, y, 3), abs=1e-6)
    border = y.copy()
    border[border == 255] = 0  # counting the ignored border as class 0 gives another number
    assert _numpy_miou(pred, border, 3) != pytest.approx(saved["student_miou"], abs=1e-6)

    again = evaluate_spec(load_spec(path), checkpoint=out)
    assert again["student_miou"] == pytest.approx(saved["student_miou"], abs=1e-9)
    assert export_spec(load_spec(path), out)["format"] == "torchvision"  # a rerun writes over its own export
    res = CliRunner().invoke(app, ["export", str(path), "--to", str(tmp_path / "by-cli")])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == (
        f"student written to {tmp_path / 'by-cli'} in torchvision's layout (constructor.json, model.safetensors): "
        "load it with torchvision.models.get_model('lraspp_mobilenet_v3_large'), then "
        "load_state_dict(safetensors.torch.load_file('model.safetensors'))")


def test_a_folder_the_dense_task_cannot_read_is_refused_in_one_line(tmp_path):
    _write_voc_folder(tmp_path / "voc")
    path = _voc_spec(tmp_path)
    bad = np.full((40, 48), 7, np.uint8)
    from PIL import Image

    Image.fromarray(bad, "L").save(tmp_path / "voc" / "SegmentationClass" / "img_1.png")
    from kdgraph.runtime.loop import train

    with pytest.raises(KDGraphError, match=r"img_1.png: the mask holds class id 7, but the data has 3 classes"):
        train(load_spec(path), quiet=True)
    assert not (tmp_path / "run" / "student.safetensors").exists()
    with pytest.raises(KDGraphError, match=r"voc is read by task dense alone, but this is a classification run "
                                           r"\(the student.s output \[2, 3\]\)"):
        compile_spec(load_spec(path, ["teacher=null", "schedule.method=supervised", "task=null",
                                      "student.model=timm:resnet18",
                                      "student.kwargs={num_classes: 3}"]), allow_missing_weights=True)
    (tmp_path / "voc" / "SegmentationClass" / "img_1.png").unlink()
    with pytest.raises(KDGraphError, match=r"img_1.png is missing \(train.txt lists 'img_1'\)"):
        compile_spec(load_spec(path), allow_missing_weights=True)


# Cityscapes' label id -> train id, as its own labels.py lists them (every other id: void, 255).
_CITYSCAPES = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
               27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _write_cityscapes_folder(root: Path, h: int = 48, w: int = 96) -> dict[str, list[Path]]:
    """A Cityscapes-layout folder: 3 train and 2 val images over two cities, 8x8 blocks of label
    ids among road (7), sidewalk (8), car (26), sky (23) and ids that are void for training
    (0 unlabeled, 4 static, 9 parking, 1 ego vehicle); the image's colour follows the block's id."""
    from PIL import Image

    g = np.random.default_rng(3)
    ids = np.array([7, 8, 26, 23, 0, 4, 9, 1], np.uint8)
    masks: dict[str, list[Path]] = {"train": [], "val": []}
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            city = ("aachen", "bochum")[i % 2]
            for top in ("leftImg8bit", "gtFine"):
                (root / top / split / city).mkdir(parents=True, exist_ok=True)
            label = ids[np.kron(g.integers(0, len(ids), size=(h // 8, w // 8)), np.ones((8, 8), np.int64))]
            wide = label.astype(np.int64)
            colour = np.stack([wide * 7, 255 - wide * 5, wide * 3], -1) % 256
            noisy = np.clip(colour + g.integers(-15, 16, size=colour.shape), 0, 255).astype(np.uint8)
            stem = f"{city}_{i:06d}_000019"
            Image.fromarray(noisy).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            mask = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            Image.fromarray(label, "L").save(mask)
            masks[split].append(mask)
    return masks


def _nearest_exact(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``a`` (H, W) at ``size`` by nearest-exact sampling: output pixel i reads input floor((i + 0.5) H / h)."""
    rows = np.floor((np.arange(size[0]) + 0.5) * a.shape[0] / size[0]).astype(int)
    cols = np.floor((np.arange(size[1]) + 0.5) * a.shape[1] / size[1]).astype(int)
    return a[rows][:, cols]


def test_a_cityscapes_folder_plans_trains_and_scores_miou_without_its_void_pixels(tmp_path):
    """Through the CLI: `kdgraph plan` lists the folder's splits, `kdgraph train` runs a U-Net pair
    two epochs, `kdgraph eval` scores the student on the val split. Its mIoU equals a numpy
    confusion matrix of the trained student's predictions on the val images (read, resized and
    normalised here) against the label ids mapped to train ids by Cityscapes' own table, void
    pixels (255) left out; counting them as road instead gives another number."""
    from PIL import Image
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from kdgraph.cli.main import app
    from kdgraph.zoo import unet_tiny_student

    masks = _write_cityscapes_folder(tmp_path / "city")
    path = tmp_path / "city.yaml"
    path.write_text(
        "name: city-tiny\nseed: 0\n"
        "teacher: {model: 'module:kdgraph.zoo:unet_tiny_teacher', kwargs: {num_classes: 19, in_chans: 3}}\n"
        "student: {model: 'module:kdgraph.zoo:unet_tiny_student', kwargs: {num_classes: 19, in_chans: 3}}\n"
        f"data: {{dataset: cityscapes, root: {tmp_path / 'city'}, input_size: [3, 32, 64], batch_size: 2}}\n"
        "decompose: {blocks: 1}\nschedule: {method: kd, epochs: 2}\nloss: {dense: pixel_kl}\n"
        "optim: {name: sgd, lr: 0.05, momentum: 0.9}\n"
        "runtime: {device: cpu, num_threads: 1, num_workers: 0, log_every: 1000}\n"
        f"output: {tmp_path / 'run'}\n")
    cli = CliRunner()
    res = cli.invoke(app, ["plan", str(path), "--format", "json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert (plan["data"]["dataset"], plan["data"]["loader"], plan["data"]["train_images"],
            plan["data"]["test_images"]) == ("cityscapes", "stream", 3, 2)
    torch.manual_seed(0)
    res = cli.invoke(app, ["train", str(path), "--quiet"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["task"] == "dense" and len(saved["per_class"]["student"]["iou"]) == 19
    # what the scores below reproduce: the whole image resized, no crop
    assert (saved["preprocessing"]["resize"], saved["preprocessing"]["crop_pct"]) == \
        ("resize to 32x64 (bilinear, antialiased), no crop", None)
    res = cli.invoke(app, ["eval", str(path), "--format", "json"])
    assert res.exit_code == 0, res.output
    scored = json.loads(res.stdout)
    assert scored["student_miou"] == pytest.approx(saved["student_miou"], abs=1e-9)

    student = unet_tiny_student(num_classes=19, in_chans=3).eval()
    student.load_state_dict(load_file(str(tmp_path / "run" / "student.safetensors")))
    mean, std = (np.array(saved["preprocessing"][k], np.float32).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    images, labels = [], []
    for mask in masks["val"]:
        image = mask.parents[2].parent / "leftImg8bit" / mask.parent.parent.name / mask.parent.name / \
            mask.name.replace("_gtFine_labelIds.png", "_leftImg8bit.png")
        pixels = np.asarray(Image.open(image).convert("RGB"), np.float32)
        images.append(F.interpolate(torch.from_numpy(pixels).permute(2, 0, 1)[None], size=(32, 64), mode="bilinear",
                                    align_corners=False, antialias=True)[0].numpy())
        ids = np.asarray(Image.open(mask), np.int64)
        labels.append(_nearest_exact(np.vectorize(lambda i: _CITYSCAPES.get(int(i), 255))(ids), (32, 64)))
    y = np.stack(labels)
    assert (y == 255).mean() > 0.2 and set(np.unique(y)) <= {0, 1, 10, 13, 255}
    with torch.no_grad():
        pred = student(torch.from_numpy((np.stack(images) / 255.0 - mean) / std)).argmax(1).numpy()
    assert scored["student_miou"] == pytest.approx(_numpy_miou(pred, y, 19), abs=1e-6)
    keep = y != 255
    assert scored["student_pixel_acc"] == pytest.approx(100 * float((pred[keep] == y[keep]).mean()), abs=1e-6)
    void_as_road = np.where(y == 255, 0, y)
    assert _numpy_miou(pred, void_as_road, 19) != pytest.approx(scored["student_miou"], abs=1e-6)

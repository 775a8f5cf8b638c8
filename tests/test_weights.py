"""kdgraph.weights: weight files read by content, never by suffix, and fitted to a model. The
truth every read is checked against is the saved model's own ``state_dict`` (or its shapes and
dtypes); a file asking the unpickler for a global is refused in every read mode without running
it (a marker file it would create stays absent); every broken file is one ModelError line."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from kdgraph.errors import KDGraphError, ModelError
from kdgraph.models import load_checkpoint
from kdgraph.weights import classifier_names, fit_state, load_state, read_state_dict, read_weights_file

TIMM = "resnet10t"  # small: 5M parameters, builds in 0.05 s


def _timm(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TIMM, num_classes=num_classes)


def _same(state: dict, truth: dict, skip: tuple[str, ...] = ()) -> None:
    keys = [k for k in truth if not k.startswith(skip)]
    assert sorted(k for k in state if not k.startswith(skip)) == sorted(keys)
    for k in keys:
        assert torch.equal(state[k], truth[k]), k


def _save_safetensors(state: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _save_torch(state, path: Path, legacy: bool = False) -> Path:
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("fmt, name", [
    ("safetensors", "w.safetensors"), ("safetensors", "w.pth"), ("safetensors", "weights"),
    ("torch", "w.pt"), ("torch", "w.safetensors"), ("torch", "pytorch_model.bin"),
    ("legacy", "w.pth.tar"), ("legacy", "w.safetensors"),
])
def test_format_is_read_from_content_not_suffix(tmp_path, fmt, name):
    source = _timm()
    truth = source.state_dict()
    path = tmp_path / name
    if fmt == "safetensors":
        _save_safetensors(truth, path)
    else:
        _save_torch(truth, path, legacy=fmt == "legacy")
    _same(read_state_dict(path), truth)
    target = _timm(seed=1)
    assert not torch.equal(target.fc.weight, source.fc.weight)
    assert load_checkpoint(target, path) == []
    _same(target.state_dict(), truth)


def test_safetensors_whose_header_length_starts_like_a_pickle(tmp_path):
    """The first byte of a safetensors file is the low byte of its header length: 0x80, the
    pickle PROTO opcode, for one length in 256 (the quickstart's folded student hit it)."""
    truth = {"w": torch.arange(6.0).reshape(2, 3)}
    for pad in range(256):
        path = tmp_path / f"{pad}.safetensors"
        save_file(truth, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no metadata length gave a header length with low byte 0x80")
    _same(read_state_dict(path), truth)


@pytest.mark.parametrize("wrap", ["ddp-in-state_dict", "model", "module", "lightning", "compiled-ddp", "timm-train"])
def test_wrappers_and_prefixes_are_stripped(tmp_path, wrap):
    truth = _timm().state_dict()

    def prefixed(prefix):
        return {prefix + k: v for k, v in truth.items()}

    saved = {
        "ddp-in-state_dict": {"state_dict": prefixed("module.")},
        "model": {"model": truth, "optimizer": {"state": {}}, "epoch": 3},  # torchvision's references
        "module": {"module": truth},
        "lightning": {"state_dict": prefixed("model."), "epoch": 1, "global_step": 10},
        "compiled-ddp": prefixed("module._orig_mod."),
        "timm-train": {"epoch": 5, "arch": TIMM, "state_dict": truth, "state_dict_ema": prefixed("ema.")},
    }[wrap]
    path = _save_torch(saved, tmp_path / "ckpt.pth")
    target = _timm(seed=1)
    load_checkpoint(target, path)
    _same(target.state_dict(), truth)


class _Wrapper(nn.Module):
    """A model whose own keys start with 'model.': the prefix must stay."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
        self.model(torch.zeros(1, 3, 5, 5))


def test_prefix_is_stripped_only_where_it_fits_better(tmp_path):
    torch.manual_seed(0)
    source = _Wrapper()
    truth = source.state_dict()
    assert all(k.startswith("model.") for k in truth)
    for saved in (truth, {"module." + k: v for k, v in truth.items()}):
        path = _save_torch(saved, tmp_path / "w.pt")
        torch.manual_seed(1)
        target = _Wrapper()
        load_checkpoint(target, path)
        _same(target.state_dict(), truth)


def test_hf_style_safetensors_with_model_prefix(tmp_path):
    truth = _timm().state_dict()
    path = _save_safetensors({"model." + k: v for k, v in truth.items()}, tmp_path / "model.safetensors")
    target = _timm(seed=1)
    load_checkpoint(target, path)
    _same(target.state_dict(), truth)


def test_mismatches_are_listed_in_one_error(tmp_path):
    state = dict(_timm().state_dict())
    state.pop("conv1.0.weight")
    state["extra.weight"] = torch.zeros(1)
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3)
    path = _save_torch(state, tmp_path / "bad.pt")
    with pytest.raises(ModelError) as info:
        load_checkpoint(_timm(), path)
    text = str(info.value)
    assert str(path) in text
    assert "missing keys (1): conv1.0.weight" in text
    assert "unexpected keys (1): extra.weight" in text
    assert "layer1.0.conv1.weight: checkpoint (3, 3)" in text


def test_classifier_names():
    assert classifier_names(_timm()) == ("fc",)
    assert classifier_names(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3)) == ("head",)
    assert classifier_names(torchvision.models.mobilenet_v3_small(num_classes=3)) == ("classifier.3",)


def test_fresh_head_never_hides_a_body_mismatch(tmp_path):
    state = dict(_timm(num_classes=1000).state_dict())
    state["layer1.0.conv1.weight"] = torch.zeros(1)
    path = _save_torch(state, tmp_path / "w.pt")
    with pytest.raises(ModelError, match="shape mismatches \\(1\\): layer1.0.conv1.weight"):
        load_checkpoint(_timm(num_classes=7), path, fresh_head=True)


def _training_checkpoint(student: dict, adapters: dict, method: str) -> dict:
    model = {**{"student." + k: v for k, v in student.items()}, **{"adapters." + k: v for k, v in adapters.items()}}
    return {"model": model, "optimizer": {}, "scheduler": {}, "rng": {}, "scaler": {},
            "position": {"epoch": 1, "step": 0, "global_step": 9}, "plan": {"method": method, "k": 4, "n": 0},
            "teacher_top1": None, "history": {}}


def test_kdgraph_checkpoint_whose_student_runs_through_adapters_is_refused(tmp_path):
    truth = _timm().state_dict()
    adapters = {"1.lift.weight": torch.zeros(4, 4, 1, 1)}
    kdmse = _save_torch(_training_checkpoint(truth, adapters, "kd+mse"), tmp_path / "kdmse.pt")
    _same(read_state_dict(kdmse), truth)  # kd+mse's adapters serve its losses only
    stable = _save_torch(_training_checkpoint(truth, adapters, "stablekd"), tmp_path / "stable.pt")
    with pytest.raises(ModelError, match="stablekd student that runs through adapters"):
        read_state_dict(stable)


class _Payload:
    """Unpickling this calls os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle", "raw-pickle-proto0", "as-safetensors"])
def test_pickle_payload_is_refused_unexecuted(tmp_path, kind):
    marker = tmp_path / "PWNED"
    payload = {"conv1.0.weight": _Payload(marker)}
    path = tmp_path / ("w.safetensors" if kind == "as-safetensors" else "w.pth")
    if kind in ("torch-zip", "as-safetensors"):
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=0 if kind.endswith("proto0") else 2))
    with pytest.raises(ModelError) as info:
        load_checkpoint(_timm(), path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text
    assert ("refusing to load" in text and "posix.system" in text) or "not a safetensors or torch file" in text
    assert not marker.exists()


def _truncated(path: Path) -> bytes:
    return path.read_bytes()[: path.stat().st_size // 2]


@pytest.mark.parametrize("content", ["empty", "garbage", "truncated-safetensors", "truncated-torch",
                                     "lying-header", "header-not-json", "tensor-list"])
def test_unreadable_files_give_one_line_errors(tmp_path, content):
    path = tmp_path / "w.pth"
    state = _timm().state_dict()
    if content == "empty":
        path.write_bytes(b"")
    elif content == "garbage":
        path.write_bytes(b"garbage" * 100)
    elif content == "truncated-safetensors":
        path.write_bytes(_truncated(_save_safetensors(state, tmp_path / "full.safetensors")))
    elif content == "truncated-torch":
        path.write_bytes(_truncated(_save_torch(state, tmp_path / "full.pt")))
    elif content == "lying-header":  # a header length past the end of the file
        path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    elif content == "header-not-json":
        path.write_bytes((8).to_bytes(8, "little") + b"{nojson!" + b"\0" * 32)
    else:
        torch.save([torch.zeros(2)], path)
    with pytest.raises(ModelError) as info:
        load_checkpoint(_timm(), path)
    text = str(info.value)
    assert "\n" not in text, text
    assert str(path) in text


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="checkpoint not found: .*nope.pt"):
        read_state_dict(tmp_path / "nope.pt")


# --- read modes, the state_dict's shape, loading onto meta tensors ---------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "torch", "legacy"])
def test_header_and_mapped_reads_keep_every_shape_and_dtype(tmp_path, fmt):
    truth = {"a": torch.arange(6, dtype=torch.int64).reshape(2, 3), "b": torch.randn(4, 1, 2).to(torch.bfloat16),
             "c": torch.ones(5, dtype=torch.float16)}
    path = tmp_path / "w.bin"
    _save_safetensors(truth, path) if fmt == "safetensors" else _save_torch(truth, path, legacy=fmt == "legacy")
    meta = read_weights_file(path, data="none")
    assert {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in meta.items()} == \
        {k: (tuple(v.shape), v.dtype, "meta") for k, v in truth.items()}
    for data in ("mmap", "read"):  # torch.equal compares values across dtypes: the dtypes apart
        state = read_weights_file(path, data=data)
        _same(state, truth)
        assert {k: v.dtype for k, v in state.items()} == {k: v.dtype for k, v in truth.items()}, data


def test_a_folder_and_non_tensor_entries_are_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match="checkpoint .* is not a file"):
        read_weights_file(tmp_path)
    path = _save_torch({"w": torch.zeros(2), "step": 3, "note": "x"}, tmp_path / "w.pt")
    with pytest.raises(ModelError, match=r"is not a state_dict: it holds non-tensor entries: step \(int\), "
                                         r"note \(str\)"):
        read_state_dict(path)
    empty = _save_torch({}, tmp_path / "empty.pt")
    with pytest.raises(ModelError, match="is not a state_dict: it holds no tensors"):
        read_state_dict(empty)
    number = _save_torch(7, tmp_path / "n.pt")
    with pytest.raises(ModelError, match="holds a int, not a state_dict"):
        read_state_dict(number)


def test_stripping_a_prefix_never_merges_two_keys():
    """{'module.w', 'w'}: stripping 'module.' would make two entries one; the keys stay as
    given and the mismatch is reported, not half of the file silently dropped."""
    model = nn.Linear(2, 2, bias=False)
    state = {"module.weight": torch.ones(2, 2), "weight": torch.zeros(2, 2)}
    with pytest.raises(ModelError, match=r"unexpected keys \(1\): module.weight"):
        fit_state(model, state, "w.pt")


def test_assign_onto_a_meta_model_takes_the_states_tensors_cast_to_the_models_dtype():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    state = {k: torch.randn(v.shape, dtype=torch.float64) for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    assert load_state(model, state, "w.safetensors", assign=True) == []
    got = model.state_dict()
    for k, v in state.items():
        assert got[k].device.type == "cpu" and got[k].dtype == torch.float32 and torch.equal(got[k], v.float()), k
    assert got["1.num_batches_tracked"].device.type == "meta"  # the state had nothing for it: the model's stays


@pytest.mark.parametrize("data", ["read", "mmap", "none"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_no_read_mode_runs_a_pickled_payload(tmp_path, data, legacy):
    """torch.load(weights_only=True) in every mode: the header-only and mapped reads of a plan
    refuse the global as the full read does, before calling it."""
    marker = tmp_path / "PWNED"
    path = _save_torch({"w": torch.zeros(2), "x": _Payload(marker)}, tmp_path / "w.pt", legacy=legacy)
    with pytest.raises(ModelError, match=r"refusing to load it, it holds pickled Python objects.*posix.system") as info:
        read_weights_file(path, data=data)
    assert "\n" not in str(info.value)
    assert not marker.exists()


class _Opaque:
    """A plain class: torch's refusal advises allowlisting it or weights_only=False."""


@pytest.mark.parametrize("payload", ["os.system", "a class"])
def test_a_refused_pickled_checkpoint_names_the_global_without_torchs_advice(tmp_path, payload):
    evil = tmp_path / "teacher.pt"
    torch.save({"conv1.weight": _Payload(tmp_path / "PWNED") if payload == "os.system" else _Opaque()}, evil)
    with pytest.raises(KDGraphError) as info:
        from kdgraph.weights import read_state_dict
        read_state_dict(evil)
    message = str(info.value)
    assert ("posix.system" if payload == "os.system" else "test_weights._Opaque") in message
    for advice in ("weights_only=False", "weights_only` set to `False", "add_safe_globals", "if you trust"):
        assert advice not in message, message
    assert "\n" not in message and not (tmp_path / "PWNED").exists()

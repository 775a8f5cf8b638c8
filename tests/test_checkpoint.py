"""kdgraph.runtime.checkpoint's CheckpointManager: one place lists what a checkpoint holds,
each owner packs and unpacks its own part; a resume restores the owners in the listed order,
leaves alone an owner whose key the checkpoint lacks, falls back to prev.pt past a damaged
last.pt; a failed write names the command that continues the run. Independent truth: the
values written by hand into the owners, read back from disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kdgraph.errors import KDGraphError
from kdgraph.runtime.checkpoint import RNG, CheckpointManager, Value, load, load_latest


@dataclass
class Folder:
    root: Path

    @property
    def last_checkpoint(self) -> Path:
        return self.root / "last.pt"

    @property
    def corrupt_checkpoint(self) -> Path:
        return self.root / "last.corrupt.pt"


def _manager(tmp_path: Path, box: dict, order: list):
    model = torch.nn.Linear(2, 1)

    def recorded(key):
        return Value(lambda: box[key], lambda s: (order.append(key), box.__setitem__(key, s)))

    states = {"plan": recorded("plan"), "model": model, "optimizer": recorded("optimizer"),
              "scheduler": recorded("scheduler"), "rng": RNG(), "position": recorded("position"),
              "extra": recorded("extra")}
    return CheckpointManager(Folder(tmp_path), states, lambda: "kdgraph train S --resume"), model


def test_a_checkpoint_holds_each_owners_state_under_its_key_and_restores_them_in_order(tmp_path):
    box = {"plan": {"k": 4}, "optimizer": {"lr": 0.1}, "scheduler": {"step": 3},
           "position": {"epoch": 1, "step": 2, "global_step": 7}, "extra": [1, 2]}
    order: list = []
    manager, model = _manager(tmp_path, box, order)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    manager.save()
    manager.written()
    expected_draw = torch.rand(3)
    on_disk = load(tmp_path / "last.pt")
    assert {k: on_disk[k] for k in ("plan", "optimizer", "scheduler", "position", "extra")} == box
    assert all(torch.equal(on_disk["model"][k], v) for k, v in weights.items())

    with torch.no_grad():
        model.weight.add_(1.0)
    restored = dict.fromkeys(box, None)
    order.clear()
    manager2, model2 = _manager(tmp_path, restored, order)
    torch.manual_seed(99)
    state, warning = manager2.restore(main=True)
    assert warning is None and order == ["plan", "optimizer", "scheduler", "position", "extra"]
    assert restored == box
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in weights.items())
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG as it was at the save


def test_a_key_the_checkpoint_lacks_leaves_its_owner_alone_and_a_check_can_refuse(tmp_path):
    box = {"plan": {"k": 4}, "optimizer": {}, "scheduler": {}, "position": {"epoch": 0}, "extra": None}
    order: list = []
    manager, _ = _manager(tmp_path, box, order)
    manager.save()
    manager.written()
    kept = {"plan": {"k": 4}, "optimizer": {}, "scheduler": {}, "position": {}, "extra": "mine"}
    manager2, _ = _manager(tmp_path, kept, order)
    manager2.restore(main=True)
    assert kept["extra"] == "mine" and "extra" not in order  # written as None: an older checkpoint's gap

    def refuse(stored):
        raise KDGraphError(f"written for another plan ({stored})")

    manager2.states["plan"] = Value(lambda: None, refuse)
    with pytest.raises(KDGraphError, match=r"written for another plan \({'k': 4}\)"):
        manager2.restore(main=True)


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    box = {"plan": {"k": 4}, "optimizer": {}, "scheduler": {}, "position": {"epoch": 1}, "extra": 1}
    manager, _ = _manager(tmp_path, box, [])
    manager.save()
    box["position"] = {"epoch": 2}
    manager.save()  # the first becomes prev.pt
    manager.written()
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    restored = dict.fromkeys(box, None)
    state, warning = _manager(tmp_path, restored, [])[0].restore(main=True)
    assert restored["position"] == {"epoch": 1} and "previous checkpoint" in warning
    assert (tmp_path / "last.corrupt.pt").read_bytes() == b"not a checkpoint"


def test_a_failed_write_names_the_command_that_continues(tmp_path):
    box = {"plan": {}, "optimizer": {}, "scheduler": {}, "position": {}, "extra": 1}
    manager, _ = _manager(tmp_path, box, [])
    (tmp_path / "last.pt").mkdir()  # a folder where the checkpoint goes: the rename fails
    (tmp_path / "last.pt" / "keep").write_text("")
    manager.save()
    with pytest.raises(KDGraphError, match=r"continue from it with `kdgraph train S --resume`"):
        manager.written()


def _mapped(path: Path) -> bool:
    """Whether this process maps ``path``: the kernel's own list (/proc/self/maps)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_a_mapped_load_maps_the_file_and_gives_the_same_state_as_a_read_one(tmp_path):
    box = {"plan": {"k": 4}, "optimizer": {"lr": 0.1}, "scheduler": {}, "position": {"epoch": 1}, "extra": None}
    manager, _ = _manager(tmp_path, box, [])
    with torch.no_grad():
        manager.states["model"].weight.copy_(torch.tensor([[1.5, -2.0]]))
    manager.save()
    manager.save()  # a prev.pt too, for the fallback
    manager.written()
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    read = load(last)
    assert not _mapped(last)
    mapped = load(last, data="mmap")
    assert _mapped(last)  # --reshard's ranks each load it: one copy in the page cache, not one per rank
    assert mapped["model"]["weight"].tolist() == [[1.5, -2.0]] and mapped["plan"] == read["plan"]
    assert all(torch.equal(read["model"][k], v) for k, v in mapped["model"].items())
    del mapped
    last.write_bytes(b"damaged")
    state, warning = load_latest(last, data="mmap")  # the fallback maps prev.pt the same way
    assert _mapped(prev) and "previous checkpoint" in warning and state["model"]["weight"].tolist() == [[1.5, -2.0]]

"""Reading a torch.export program (model.pt2) from anyone without running what it holds
(kdgraph/runtime/program.py): a program of the kind kdgraph exports passes ``check_program``
and loads; each way an archive can make ``torch.export.load`` run code (a pickled weight, sample
inputs or custom object, a node target reaching os.system, guard code, a symbolic expression
sympify would evaluate, a pickled entry hidden behind a clean copy of its name) is refused
before loading, and where torch's own reader would run it, it does: the marker file appears.

Independent truth: real archives written by ``torch.export.save``, edited here entry by entry."""

from __future__ import annotations

import pytest
import torch

from _runtime_helpers import run_cli, tiny_spec, write_spec
from test_hostile_inputs import _one_line_error, _Payload


def _tiny_program(path, channels=1, classes=10, dynamic=True):
    """A real torch.export archive of a tiny CxHxW=channelsx8x8 classifier with a dynamic batch, as kdgraph
    writes them (``dynamic=False``: a fixed batch of 2)."""
    from torch import nn

    model = nn.Sequential(nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, classes))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(model.eval(), (torch.randn(2, channels, 8, 8),),
                                  dynamic_shapes=({0: batch},) if dynamic else None, strict=False)
    torch.export.save(program, str(path))
    return path


def _rewrite_archive(src, dst, edit):
    import warnings
    import zipfile

    with zipfile.ZipFile(src) as z:
        files = {name: z.read(name) for name in z.namelist()}
    edit(files)
    entries = files.pop("__entries__", None) or list(files.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a name written twice, and writes it
        with zipfile.ZipFile(dst, "w") as z:
            for name, data in entries:
                z.writestr(name, data)
    return dst


def _pickled(marker) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    return buffer.getvalue()


def _edit_json(files, suffix, edit):
    import json

    name = next(n for n in files if n.endswith(suffix))
    data = json.loads(files[name])
    edit(data)
    files[name] = json.dumps(data).encode()
    return name


def _pickled_weight(marker):
    def edit(files):
        holder = {}

        def mark(cfg):
            fqn = next(iter(cfg["config"]))
            cfg["config"][fqn]["use_pickle"] = True
            holder["file"] = cfg["config"][fqn]["path_name"]
        name = _edit_json(files, "model_weights_config.json", mark)
        files[name.rsplit("/", 1)[0] + "/" + holder["file"]] = _pickled(marker)
    return edit


def _pickled_sample_inputs(marker):
    def edit(files):
        files[next(n for n in files if "/sample_inputs/" in n)] = _pickled(marker)
    return edit


def _graph_edit(change):
    def edit(files):
        _edit_json(files, "models/model.json", change)
    return edit


def _target_os_system(marker):
    def change(program):
        node = next(n for n in program["graph_module"]["graph"]["nodes"] if "relu" in n["target"])
        node["target"] = "torch.os.system"
    return _graph_edit(change)


def _guards_code(marker):
    return _graph_edit(lambda program: program.__setitem__("guards_code", [f"__import__('os').system('touch {marker}')"]))


def _sympy_expr(marker):
    def change(program):
        stack = [program]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if "expr_str" in node:
                    node["expr_str"] = f"__import__('os').system('touch {marker}')"
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    return _graph_edit(change)


def _custom_object(marker):
    def edit(files):
        root = next(iter(files)).split("/", 1)[0]
        files[f"{root}/data/constants/custom_obj_0"] = _pickled(marker)
    return edit


def _pickled_copies_then_a_clean_one(marker, copies=30, rename=lambda name: name):
    """The weights config ``copies`` times marked ``use_pickle`` (its weight a code payload), then
    once clean: zipfile returns the last copy, torch's reader a pickled one."""
    def edit(files):
        clean = dict(files)
        _pickled_weight(marker)(files)
        name = next(n for n in files if n.endswith("model_weights_config.json"))
        evil = files.pop(name)
        files["__entries__"] = list(files.items()) + [(rename(name), evil)] * copies + [(name, clean[name])]
    return edit


def _sample_inputs_with_a_pickled_copy(marker):
    """The sample inputs (a torch zip inside the zip) holding data.pkl twice: a code payload, then the
    clean one."""
    def edit(files):
        import io
        import warnings
        import zipfile

        name = next(n for n in files if "/sample_inputs/" in n)
        with zipfile.ZipFile(io.BytesIO(files[name])) as inner:
            entries = [(i.filename, inner.read(i)) for i in inner.infolist()]
        with zipfile.ZipFile(io.BytesIO(_pickled(marker))) as evil:
            payload = evil.read(next(n for n in evil.namelist() if n.endswith("data.pkl")))
        pkl = next(n for n, _ in entries if n.endswith("data.pkl"))
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with zipfile.ZipFile(buffer, "w") as out:
                out.writestr(pkl, payload)
                for n, d in entries:
                    out.writestr(n, d)
        files[name] = buffer.getvalue()
    return edit


_CRAFTED = {"pickled weight": _pickled_weight, "pickled sample inputs": _pickled_sample_inputs,
            "target torch.os.system": _target_os_system, "guards_code": _guards_code,
            "expression": _sympy_expr, "custom object": _custom_object,
            "pickled config given 31 times, the last clean": _pickled_copies_then_a_clean_one,
            "sample inputs holding data.pkl twice": _sample_inputs_with_a_pickled_copy,
            "pickled config under a name differing in case": lambda marker: _pickled_copies_then_a_clean_one(
                marker, copies=1, rename=lambda name: name.replace("model_weights", "Model_weights"))}


def test_kdgraphs_own_kind_of_program_passes_the_check(tmp_path):
    from kdgraph.runtime.program import check_program

    check_program(_tiny_program(tmp_path / "model.pt2"))


@pytest.mark.parametrize("craft", list(_CRAFTED))
def test_a_crafted_program_is_refused_unloaded(tmp_path, craft):
    from kdgraph.runtime.program import UnsafeProgramError, check_program

    marker = tmp_path / "PWNED"
    folder = tmp_path / "export"
    folder.mkdir()
    good = _tiny_program(tmp_path / "model.pt2")
    evil = _rewrite_archive(good, folder / "model.pt2", _CRAFTED[craft](marker))
    with pytest.raises(UnsafeProgramError, match="refusing to load"):
        check_program(evil)
    if craft.startswith("pickled config"):  # the payload is live: torch's own reader runs it
        proc = run_cli("eval", str(write_spec(tiny_spec(tmp_path / "run", "kd"), tmp_path / "spec.yaml")),
                       "--checkpoint", str(folder))
        _one_line_error(proc, "refusing to load", str(evil), "weights_config.json", "readers could disagree")
        assert not marker.exists()
        with pytest.raises(Exception):
            torch.export.load(str(evil))
        assert marker.exists()
        return
    if craft == "pickled weight":  # through the CLI: one line, exit 2, nothing run
        spec = write_spec(tiny_spec(tmp_path / "run", "kd"), tmp_path / "spec.yaml")
        proc = run_cli("eval", str(spec), "--checkpoint", str(folder))
        _one_line_error(proc, "refusing to load", str(evil), "stored pickled")
        assert evil.exists()
    assert not marker.exists()


def test_a_checked_program_loads_and_computes_its_models_forward(tmp_path):
    """What passes the check is a working program: loaded, it gives the eager model's outputs at
    a batch size other than the traced one (its dynamic batch's shape expressions passed too)."""
    from torch import nn

    from kdgraph.runtime.program import check_program

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: batch},),
                                          strict=False), str(path))
    check_program(path)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(path)).module()(x), model(x))


def test_an_archive_not_written_by_torch_export_is_refused(tmp_path):
    """Not a zip; a zip whose entries are not under one folder; one folder without models/*.json."""
    import zipfile

    from kdgraph.runtime.program import UnsafeProgramError, check_program

    text = tmp_path / "text.pt2"
    text.write_text("not a zip")
    with pytest.raises(UnsafeProgramError, match="text.pt2"):
        check_program(text)
    for name, entries in (("loose", ["model/archive_format", "other/archive_format"]),
                          ("nomodels", ["model/archive_format", "model/byteorder"])):
        path = tmp_path / f"{name}.pt2"
        with zipfile.ZipFile(path, "w") as z:
            for entry in entries:
                z.writestr(entry, "x")
        with pytest.raises(UnsafeProgramError, match="not a torch.export archive"):
            check_program(path)
    good = _tiny_program(tmp_path / "good.pt2")
    evil = _rewrite_archive(good, tmp_path / "evil.pt2",
                            lambda files: files.__setitem__(next(iter(files)).split("/", 1)[0] + "/data/x.py", b"1"))
    with pytest.raises(UnsafeProgramError, match="data/x.py: an entry torch.export.save does not write"):
        check_program(evil)

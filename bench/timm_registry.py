"""Plan every timm family: teacher = student = the family's smallest variant, checked against
timm's own ``feature_info`` (an independent truth for where features are tapped).

For each timm module (family) the smallest model is chosen (parameter count on the meta
device among a shortlist by name), built with random weights (never pretrained), planned
at a small input where the model allows it (64 px with ``img_size=64``, else the model's
default input size) and compared with ``feature_info``. Each model runs in a forked child
under a time budget. Every model ends in one status:

  agree      the plan compiles; every feature_info tap is a cut of its width and reduction,
             and a tap alone at its reduction ends its stage (or the stage end carries the
             same tensor). Stages whose end a tap moved (Stage.tap) are listed in "taps"
             and counted in the report: there feature_info was a hint, not only an oracle
  explained  the plan compiles; a tap differs for a stated reason (no single tensor crosses
             there, or feature_info names a module the classifier lacks)
  differ     the plan compiles but disagrees with feature_info for no stated reason
  refusal    a clean one-line kdgraph error (TraceError, PlanError)
  traceback  any other exception: a kdgraph bug
  timeout    over the per-model budget
  unbuildable  timm itself cannot build the model here (not counted)

Results are JSON lines in bench/results/timm_registry.jsonl; a rerun skips the families
already there (``--retry differ,traceback,timeout`` runs those again), so it can run in
pieces in the background:

    nice -n 10 python bench/timm_registry.py --budget 30 --minutes 25
    python bench/timm_registry.py --report
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "timm_registry.jsonl"
STATUSES = ("agree", "explained", "differ", "refusal", "traceback", "timeout", "unbuildable")

# Smaller first: the size words timm names use, ranked.
_SIZE_WORDS = ["atto", "femto", "pico", "nano", "xxxs", "xxs", "xs", "xxsmall", "xsmall", "tiny", "ti",
               "mini", "micro", "t", "s0", "small", "s", "b0", "a0", "a", "lite", "m", "medium", "base", "b"]


def _size_score(name: str) -> tuple:
    tokens = re.split(r"[_.\-]", name)
    rank = min((_SIZE_WORDS.index(t) for t in tokens if t in _SIZE_WORDS), default=len(_SIZE_WORDS))
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    return rank, len(name), numbers


def smallest_variant(family: str, shortlist: int = 6) -> str | None:
    """The family's model with the fewest parameters among a shortlist ranked by name."""
    import timm
    import torch

    names = sorted(timm.list_models(module=family), key=_size_score)
    best = None
    for name in names[:shortlist]:
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                n = sum(p.numel() for p in timm.create_model(name, num_classes=10).parameters())
        except Exception:
            continue
        if best is None or n < best[0]:
            best = (n, name)
    return best[1] if best else (names[0] if names else None)


def _build(name: str, small: bool):
    import timm
    import torch

    torch.manual_seed(0)
    kw = {"num_classes": 10}
    if small:
        kw["img_size"] = 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False, **kw).eval()
    size = 64 if small else tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))[-1]
    return model, size


def _spec(name: str, size: int, blocks: int):
    from kdgraph.spec import load_spec

    ref = {"model": f"timm:{name}", "kwargs": {"num_classes": 10}}
    return load_spec({"name": name, "teacher": ref, "student": ref, "decompose": {"blocks": blocks},
                      "schedule": {"method": "stablekd", "recompositions": 0},
                      "data": {"dataset": "synthetic", "input_size": [3, size, size]}})


def compare(model, art) -> tuple[str, list[str]]:
    """(status, reasons) of one planned model against its feature_info."""
    from torch import nn

    from kdgraph.compiler.stages import same_value

    modules = dict(model.named_modules())
    traced, cuts, stages = art.traced, art.cuts, art.stages
    infos = [dict(fi) for fi in getattr(model, "feature_info", [])]
    explained, differ = [], []
    per_reduction = Counter(fi["reduction"] for fi in infos)
    in_graph = {p for info in traced.nodes.values() for p in info.modules}
    names = Counter(fi["module"] for fi in infos)
    for fi in infos:
        m = fi["module"]
        if not m or m not in modules:
            explained.append(f"feature_info names {m!r}, a module the classifier does not have")
            continue
        if names[m] > 1:
            explained.append(f"feature_info taps {names[m]} outputs of {m!r}: several tensors, not one cut")
            continue
        # A ModuleList the forward iterates is never called itself: its last child ends it.
        while m not in in_graph and isinstance(modules[m], (nn.ModuleList, nn.ModuleDict)) and len(modules[m]):
            m = f"{m}.{list(modules[m]._modules)[-1]}"
        closing = [c for c in cuts if m in c.closes]
        if not closing:
            if m in in_graph:
                explained.append(f"no single tensor crosses after {m!r} (more than one value is live there)")
            else:
                differ.append(f"{m!r} is not in the traced graph (inside a leaf module)")
            continue
        cut = next((c for c in closing if c.channels == fi["num_chs"] and c.reduction == fi["reduction"]), None)
        if cut is None:
            c = closing[0]
            differ.append(f"{m!r}: timm {fi['num_chs']} ch /{fi['reduction']}, kdgraph {c.channels} ch "
                          f"/{c.reduction} {list(c.shape)} {c.layout}")
            continue
        if per_reduction[fi["reduction"]] != 1:
            continue
        stage = next((s for s in stages if cut in s.cuts), None)
        if stage is None:
            differ.append(f"{m!r} is in no stage")
        elif not (stage.end is cut or m in stage.end.closes or same_value(traced, stage.end, cut)):
            differ.append(f"{m!r}: its stage ends at {stage.end.label!r}")
    if differ:
        return "differ", differ + explained
    return ("explained" if explained else "agree"), explained


def run_one(name: str) -> dict:
    """Plan ``name`` (teacher = student) and compare it with feature_info."""
    import torch

    from kdgraph.compiler import compile_spec
    from kdgraph.errors import KDGraphError

    torch.set_num_threads(1)
    rec: dict = {"model": name}
    try:
        model, size = _build(name, small=True)
    except Exception:
        try:
            model, size = _build(name, small=False)
        except Exception as exc:
            return {**rec, "status": "unbuildable", "detail": f"{type(exc).__name__}: {str(exc)[:200]}"}
    # Five blocks as in the paper; fewer where the model has fewer stages to cut at.
    attempts = [(model, size, True, 5)]
    for m, s, small, blocks in attempts:
        rec.update(input=s, blocks=blocks)
        try:
            c = compile_spec(_spec(name, s, blocks), models=(copy.deepcopy(m), m))
        except KDGraphError as exc:
            if "cannot be cut into" in str(exc) and blocks > 2:
                attempts.append((m, s, small, blocks - 1))
                continue
            # A model built for 64 px that cannot run there: once more at its own size.
            if small and "running it on a batch" in str(exc):
                try:
                    attempts.append((*_build(name, small=False), False, blocks))
                    continue
                except Exception:
                    pass
            return {**rec, "status": "refusal", "detail": str(exc).splitlines()[0][:300]}
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            frame = next((f for f in reversed(tb) if "kdgraph" in f.filename), tb[-1])
            return {**rec, "status": "traceback",
                    "detail": f"{type(exc).__name__}: {str(exc)[:200]} at {Path(frame.filename).name}:{frame.lineno}"}
        status, reasons = compare(m, c.student)
        if status == "differ" and small and any(" ch /" in r for r in reasons):
            # A grid that 64 px does not tile (sequencer's stride 7): the model's own size decides.
            try:
                attempts.append((*_build(name, small=False), False, blocks))
                rec["at_64px"] = "; ".join(reasons)[:300]
                continue
            except Exception:
                pass
        return {**rec, "status": status, "detail": "; ".join(reasons)[:600],
                "boundaries": [b.cut.label for b in c.student.boundaries],
                "feature_info": [fi["module"] for fi in getattr(m, "feature_info", [])],
                "leaves": list(c.student.traced.leaves),
                "taps": [st.tap for st in c.student.stages if st.tap]}
    return {**rec, "status": "refusal", "detail": "no input size works"}


def _child(name: str, conn) -> None:
    try:
        conn.send(run_one(name))
    except BaseException as exc:  # report everything; the parent decides
        conn.send({"model": name, "status": "traceback", "detail": f"{type(exc).__name__}: {exc}"[:300]})


def run_budgeted(name: str, budget: float) -> dict:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(name, child))
    p.start()
    if parent.poll(budget):
        rec = parent.recv()
    else:
        rec = {"model": name, "status": "timeout", "detail": f"over {budget:.0f} s"}
    p.kill()
    p.join()
    return rec


def load_results() -> list[dict]:
    if not RESULTS.exists():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def report(records: list[dict]) -> str:
    counts = Counter(r["status"] for r in records)
    counted = sum(v for k, v in counts.items() if k != "unbuildable")
    ok = counts["agree"] + counts["explained"]
    moved = sum(1 for r in records if any(t.startswith("feature_info tap") for t in r.get("taps", ())))
    leaves = sum(1 for r in records if r.get("leaves"))
    lines = [f"{len(records)} families: " + ", ".join(f"{s} {counts[s]}" for s in STATUSES if counts[s]),
             f"agree or explained: {ok}/{counted} = {100 * ok / max(counted, 1):.1f} %",
             f"planned with a stage end moved to a feature_info tap: {moved}; with fx leaves: {leaves}"]
    for status in ("differ", "traceback", "timeout", "refusal"):
        for r in records:
            if r["status"] == status:
                lines.append(f"  {status:9s} {r['family']:28s} {r['model']:34s} {r.get('detail', '')[:160]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds per model")
    ap.add_argument("--minutes", type=float, default=1e9, help="stop starting new models after this")
    ap.add_argument("--families", default="", help="comma-separated timm modules (default: all)")
    ap.add_argument("--retry", default="", help="statuses to run again, e.g. differ,traceback,timeout")
    ap.add_argument("--report", action="store_true", help="print the counts of the results file and exit")
    args = ap.parse_args()

    records = load_results()
    if args.report:
        print(report(records))
        return
    import timm

    import kdgraph.compiler  # noqa: F401  imported once: the forked children share it
    import kdgraph.stages  # noqa: F401

    retry = set(filter(None, args.retry.split(",")))
    families = [f for f in args.families.split(",") if f] or timm.list_modules()
    done = {r["family"] for r in records if r["status"] not in retry}
    start = time.monotonic()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for family in families:
        if family in done:
            continue
        if time.monotonic() - start > args.minutes * 60:
            print("time is up; run again to go on")
            break
        name = next((r["model"] for r in records if r["family"] == family), None) or smallest_variant(family)
        if name is None:
            continue
        t0 = time.monotonic()
        rec = {"family": family, **run_budgeted(name, args.budget), "seconds": round(time.monotonic() - t0, 1)}
        print(f"{rec['status']:10s} {family:28s} {name:34s} {rec['seconds']:6.1f}s {rec.get('detail', '')[:120]}",
              flush=True)
        records = [r for r in records if r["family"] != family] + [rec]
        RESULTS.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(report(records))


if __name__ == "__main__":
    main()

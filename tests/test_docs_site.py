"""The docs site (mkdocs.yml, docs/): built strictly, so a broken link, a missing anchor, a page
left out of the nav or a stale API reference fails the suite; and the README stays a landing
page whose links into the docs resolve."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from _runtime_helpers import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _build(root, site) -> subprocess.CompletedProcess:
    """mkdocs build --strict; not --quiet, which hides the warnings from the strict count (mkdocs 1.6)."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})


def _headings(text: str, levels: str = "#{1,3}") -> list[str]:
    """Headings outside code fences."""
    found, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(rf"^({levels}) (.+)$", line)):
            found.append(m.group(2).strip())
    return found


def test_site_builds_strictly(tmp_path):
    done = _build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    site = tmp_path / "site"
    benchmarks = (site / "benchmarks" / "index.html").read_text()
    assert "StableKD at the paper" in benchmarks  # BENCHMARKS.md, included
    pictures = re.findall(r'<img alt="[^"]*" src="\.\./(bench/results/[^"]+)"', benchmarks)
    assert len(pictures) >= 5
    for src in re.findall(r'<img alt="[^"]*" src="\.\./(bench/results/[^"]+)"', benchmarks):
        assert (site / src).is_file(), src  # its pictures, served by docs/hooks.py
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "load_spec" in api and "Read, override and validate a spec." in api  # from the docstring
    assert "data.batch_size" in (site / "reference" / "spec" / "index.html").read_text()
    own_data = (site / "tasks" / "classification" / "index.html").read_text()
    assert "yaml-language-server" in own_data  # the shipped spec file, included as it is


def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    """One build of a copy with a link to a missing page and one to a missing anchor: both named."""
    copy = tmp_path / "repo"
    shutil.copytree(DOCS, copy / "docs")
    for extra in ("mkdocs.yml", "BENCHMARKS.md"):
        shutil.copy(ROOT / extra, copy / extra)
    shutil.copytree(ROOT / "specs", copy / "specs")
    (copy / "bench" / "results").mkdir(parents=True)
    for png in (ROOT / "bench" / "results").glob("*.png"):
        shutil.copy(png, copy / "bench" / "results" / png.name)
    shutil.copytree(ROOT / "kdgraph", copy / "kdgraph", ignore=shutil.ignore_patterns("__pycache__"))
    page = copy / "docs" / "getting-started.md"
    page.write_text(page.read_text() + "\nSee [a page](no-such-page.md) and [an anchor](concepts.md#no-such-anchor).\n")
    done = _build(copy, tmp_path / "site")
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "no-such-page.md" in said and "no-such-anchor" in said, said


def test_every_page_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages == set(re.findall(r":\s+([\w/.-]+\.md)\s*$", config, flags=re.M))


def test_readme_is_a_landing_page_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert len(links) >= 10
    for link in links:  # relative to the repository root
        assert (ROOT / link).is_file(), link
    for link, anchor in re.findall(r"\]\((docs/[^)#]+)#([^)]+)\)", text):  # an anchor names a heading there
        slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in _headings((ROOT / link).read_text(), "#{1,6}")}
        assert anchor in slugs, f"{link}#{anchor}"


def test_concepts_draws_the_compilers_pipeline():
    from kdgraph.compiler import pipeline_mermaid

    assert "```mermaid\n" + pipeline_mermaid() + "```" in (DOCS / "concepts.md").read_text()
    picture = DOCS / "assets" / "plan-quickstart.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(assets/plan-quickstart.png)" in (DOCS / "concepts.md").read_text()

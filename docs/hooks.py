"""mkdocs hook: the pictures BENCHMARKS.md shows (bench/results/*.png, outside docs/) are
served at the same relative paths, so the benchmarks page includes BENCHMARKS.md unchanged."""

from pathlib import Path

from mkdocs.structure.files import File


def on_files(files, config):
    root = Path(config["config_file_path"]).parent
    for png in sorted((root / "bench" / "results").glob("*.png")):
        files.append(File(str(png.relative_to(root)), str(root), config["site_dir"], config["use_directory_urls"]))
    return files

#!/usr/bin/env bash
# Here, before a GPU call (`make gpu-wheels`): what a bare GPU machine lacks, put where the
# device tool carries it (both folders are git-ignored; name them in the call's carry):
#   .whl/  wheels of kdgraph's pure-Python dependencies, at the versions of this .venv, for the
#          machine's Python (3.12, x86-64; KINDS.md); run.sh installs them there
#   .gpu/fashion-mnist/  Fashion-MNIST's IDX files (bench/data_throughput.py, bench/stablekd_study.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
TARGET_PY=${TARGET_PY:-3.12}
# kdgraph's imports and theirs that the machine's image may lack or hold at other versions;
# torch, torchvision, numpy, pillow, huggingface_hub, matplotlib, scikit-learn, pytest stay the image's.
NAMES="pydantic pydantic_core annotated-types typing-inspection typing_extensions typer click shellingham
rich markdown-it-py mdurl Pygments annotated-doc timm networkx PyYAML safetensors"
pins=()
for name in $NAMES; do
    version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
    [ -n "$version" ] && pins+=("$name==$version")
done
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
FASHION=${FASHION:-/usr/share/datasets/fashion-mnist}
if [ -d "$FASHION" ]; then
    mkdir -p .gpu/fashion-mnist && cp "$FASHION"/*-ubyte.gz .gpu/fashion-mnist/
fi
du -sh .whl .gpu 2>/dev/null
ls .whl

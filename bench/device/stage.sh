#!/usr/bin/env bash
# Stages the service's dependencies on a bare GPU machine (the device image: torch, transformers,
# accelerate, safetensors; no diffusers, Ray, pydantic, ffmpeg) from wheels carried in .whl/:
#   bench/device/stage.sh wheels   run1/ and openai/ wheels (those present) + gpu-extras.tar.xz (FA3, imageio-ffmpeg)
#   bench/device/stage.sh ray      raysite.tar.xz (ray[serve] + diffusers + pydantic)
#   bench/device/stage.sh folder   a full-size random-weight release folder in $WAN_CKPT_DIR (~100 s)
# Everything goes under /tmp, which lasts while the machine stays warm: runs that need it must follow
# one another. Then: export PYTHONPATH=$PWD:/tmp/site WAN_CKPT_DIR=/tmp/wan13b.
set -euo pipefail
SITE=/tmp/site
mkdir -p "$SITE"
case "$1" in
  wheels)
    shopt -s nullglob
    wheels=(.whl/run1/*.whl .whl/openai/*.whl)
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}"
    tar -xJf .whl/gpu-extras.tar.xz -C "$SITE" ;;
  ray)
    tar -xJf .whl/raysite.tar.xz -C "$SITE" ;;
  folder)
    python3 -c "import sys; sys.path.insert(0, 'bench'); import load_original as L; from pathlib import Path; L.write_release_folder(Path('${WAN_CKPT_DIR:-/tmp/wan13b}'), False)" ;;
  *) echo "usage: $0 wheels|ray|folder" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Prepare the wheels benchmarks/gpu_suite.sh installs on an offline GPU host (Python 3.12 with torch,
# torchaudio, torchvision, pyarrow, pandas, numpy, tokenizers, transformers, typer, tqdm, rich; no
# deepspeed, ray, mlflow, pydantic, soundfile, and no network). Extended from
# ../shared/tools/gpu-wheels.sh: besides deepspeed and pydantic it carries what deepspeed and ray
# declare and such a host lacks (msgpack, protobuf, psutil, py-cpuinfo, einops, ninja, nvidia-ml-py,
# jsonschema, tensorboardX). MLflow is not carried: the suite runs megaray with tracking off.
# Run from the project's root on a machine with network; it fills ./.whl/ and ./.whl2/ (git-ignored).
#
#   benchmarks/gpu-wheels.sh          deepspeed + its missing needs (about 15 MB)
#   benchmarks/gpu-wheels.sh --ray    also ray (79 MB: more than one 64 MiB transfer, so split in
#                                     two parts: .whl2 holds the first, .whl the second)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude="$(git rev-parse --git-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
grep -qx '/.whl2/' "$exclude" 2>/dev/null || echo '/.whl2/' >> "$exclude"
rm -rf .whl .whl2 && mkdir -p .whl
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
dl() { python3 -m pip download -q --no-deps "${plat[@]}" -d "$1" "${@:2}" 2>&1 | grep -v 'WARNING: Location' || true; }

python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8 2>&1 | grep -v 'WARNING: Location' || true
dl .whl hjson pydantic pydantic-core annotated-types typing-inspection \
  msgpack psutil py-cpuinfo einops ninja nvidia-ml-py

if [ "${1:-}" = "--ray" ]; then
  mkdir -p .whl2
  dl .whl2 ray==2.60.0
  dl .whl jsonschema jsonschema-specifications referencing rpds-py tensorboardX "protobuf>=3.20.3,<7"
  (cd .whl2 && split -b 40m ray-*.whl ray.part. && rm ray-*.whl)
  mv .whl2/ray.part.ab .whl/
  cat <<'MSG'
Two transfers to the GPU host, the second while the host still holds the first:
  1) bring .whl2, run:  mkdir -p /root/stash && cp .whl2/ray.part.aa /root/stash/
  2) bring .whl, run:   bash benchmarks/gpu_suite.sh   (it joins the ray parts and installs .whl)
MSG
else
  cat <<'MSG'
On the GPU host: bring .whl along; benchmarks/gpu_suite.sh installs it (python3 -m pip install
--no-index --no-deps --target /tmp/site .whl/*.whl) and puts /tmp/site on PYTHONPATH.
MSG
fi
du -sh .whl ${1:+.whl2} 2>/dev/null || true

#!/usr/bin/env bash
# Prepare what a lent GPU machine needs for scripts/gpu-check.sh. Runs HERE (the CPU machine with
# the full .venv), before the device call; everything goes to .gpu-carry/ (git-ignored), which the
# device call carries with carry=[".gpu-carry"].
#
# The device has Python 3.12 with torch (CUDA), onnx, onnxruntime, triton, cupy and nvidia-ml-py,
# and can fetch nothing. A call carries at most 64 MiB: the working tree plus the carried paths.
# So this script makes:
#   .gpu-carry/wheels/    cp312 manylinux x86_64 wheels of what serve-kit's core path, the GPU
#                         tests and benchmarks/gpu_bench.py import and the device probably lacks
#                         (pinned to the versions in .venv, the ones the test suite passed with)
#   .gpu-carry/prepared/  the models and data, made here so the device needs neither scikit-learn,
#                         transformers nor nvidia-modelopt (see its README)
# and checks that the wheel set resolves on its own for CPython 3.12 and that the whole call fits.
#
# Usage: scripts/gpu-prepare.sh [--skip-wheels] [--skip-models]
#   PYTHON=...  the interpreter with serve-kit[torch,nlp,modelopt] (default: .venv/bin/python)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
CARRY=$ROOT/.gpu-carry
WHEELS=$CARRY/wheels
PREPARED=$CARRY/prepared
LIMIT_MIB=64          # what one device call can carry (working tree + carried paths)
TARGET_MIB=60         # what this script accepts, leaving room for the tree to grow

skip_wheels=0
skip_models=0
for a in "$@"; do
  case "$a" in
    --skip-wheels) skip_wheels=1 ;;
    --skip-models) skip_models=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a" >&2; exit 2 ;;
  esac
done

# What the device is assumed to lack. Core dependencies from pyproject.toml (typer, rich, pydantic,
# pyyaml, orjson, httptools, uvloop, hdrhistogram) with their own dependencies, pytest for the GPU
# tests, safetensors for the prepared weights. Left out on purpose: numpy, onnx, onnxruntime,
# protobuf, torch and nvidia-ml-py (the device has them, and its torch pins what numpy it needs);
# grpcio (6 MB; neither the GPU tests nor the bench import it); hypothesis (no GPU test uses it).
# pbr and setuptools are hdrhistogram's declared dependencies (hdrh never imports pbr), carried
# so that pip can resolve the set without --no-deps.
PACKAGES=(
  pydantic pydantic-core annotated-types typing-extensions typing-inspection
  typer shellingham annotated-doc rich markdown-it-py mdurl pygments
  pyyaml orjson httptools uvloop hdrhistogram pbr setuptools
  pytest pluggy iniconfig packaging
  safetensors
)
# What gpu-check.sh asks pip for on the device (pyproject's ranges, so a device package that
# already satisfies one is kept); keep in step with REQUIREMENTS in scripts/gpu-check.sh.
REQUIREMENTS=(
  "typer>=0.29,<1" "rich>=13.7,<16" "pydantic>=2.7,<3" "pyyaml>=6.0,<7" "orjson>=3.10,<4"
  "httptools>=0.6,<1" "uvloop>=0.19,<1" "hdrhistogram>=0.10,<0.11" "pytest>=8,<10" "safetensors>=0.4,<1"
)
PLATFORM_ARGS=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
               --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
               --platform manylinux_2_28_x86_64 --platform manylinux_2_5_x86_64
               --platform manylinux1_x86_64 --platform any --only-binary=:all:)

mkdir -p "$CARRY"

if [ "$skip_wheels" = 0 ]; then
  echo "== wheels (cp312, manylinux x86_64) -> $WHEELS"
  rm -rf "$WHEELS"
  mkdir -p "$WHEELS"
  # Pin each package to the version installed here (tested); latest where it is not installed.
  mapfile -t PINNED < <("$PY" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
EOF
)
  for spec in "${PINNED[@]}"; do
    # (this machine's pip configuration names local indexes that do not exist: drop those warnings)
    "$PY" -m pip download -q --disable-pip-version-check --no-deps "${PLATFORM_ARGS[@]}" -d "$WHEELS" "$spec" \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) \
      || { echo "pip download failed for $spec" >&2; exit 1; }
  done
  ls -1 "$WHEELS"

  echo "== checking that the wheels resolve on their own for CPython 3.12 (pip --dry-run --no-index)"
  report=$(mktemp)
  # No pip configuration (this machine's adds find-links and indexes): only .gpu-carry/wheels counts.
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
  "$PY" -m pip install -q --disable-pip-version-check --dry-run --ignore-installed --no-index \
      --find-links "$WHEELS" "${PLATFORM_ARGS[@]}" --target "$(mktemp -d)" --report "$report" \
      "${REQUIREMENTS[@]}"
  "$PY" - "$report" "$WHEELS" <<'EOF'
import json, os, re, sys
report, wheels = sys.argv[1], sys.argv[2]
chosen = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.load(open(report))["install"])
print(f"resolves: {len(chosen)} distributions: " + " ".join(chosen))
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
carried = {norm(f.split("-")[0]) for f in os.listdir(wheels) if f.endswith(".whl")}
unused = carried - {norm(c.split("==")[0]) for c in chosen}
if unused:
    print("carried but not needed by the requirements: " + ", ".join(sorted(unused)))
EOF
  rm -f "$report"
fi

if [ "$skip_models" = 0 ]; then
  echo "== prepared models and data -> $PREPARED"
  rm -rf "$PREPARED"
  "$PY" "$ROOT/benchmarks/gpu_bench.py" prepare --to "$PREPARED"
  # scikit-learn's digits for the GPU tests' small models (tests/sk_models.py), as the device has
  # no scikit-learn.
  "$PY" -c "import sys, numpy as np; from sklearn.datasets import load_digits; d = load_digits(); \
np.savez_compressed(sys.argv[1], data=d.data.astype(np.uint8), target=d.target.astype(np.uint8))" \
    "$PREPARED/sklearn_digits.npz"
fi

echo "== size of one device call (limit $LIMIT_MIB MiB: the working tree + .gpu-carry)"
"$PY" - "$ROOT" "$CARRY" "$TARGET_MIB" <<'EOF'
import os, subprocess, sys
root, carry, target = sys.argv[1], sys.argv[2], float(sys.argv[3])
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                       capture_output=True, check=True).stdout.decode().split("\0")
tree = sum(os.path.getsize(os.path.join(root, f)) for f in files if f and os.path.isfile(os.path.join(root, f)))
parts = {}
for dirpath, _, names in os.walk(carry):
    for n in names:
        rel = os.path.relpath(dirpath, carry).split(os.sep)[0]
        parts[rel] = parts.get(rel, 0) + os.path.getsize(os.path.join(dirpath, n))
mib = lambda b: b / 2**20
for k, v in sorted(parts.items()):
    print(f"  .gpu-carry/{k:<10} {mib(v):7.2f} MiB")
total_carry = sum(parts.values())
print(f"  .gpu-carry total  {mib(total_carry):7.2f} MiB")
print(f"  working tree      {mib(tree):7.2f} MiB")
print(f"  one device call   {mib(total_carry + tree):7.2f} MiB (accepted up to {target:g} MiB)")
if mib(total_carry + tree) > target:
    sys.exit("too big for one device call")
EOF
echo "ready: run scripts/gpu-check.sh on the device with carry [\".gpu-carry\"]"

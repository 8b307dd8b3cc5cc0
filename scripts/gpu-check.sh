#!/usr/bin/env bash
# The GPU check: ONE prepared script for a lent GPU machine (one H200, Python 3.12 with a CUDA torch,
# onnx, onnxruntime, triton, cupy, nvidia-ml-py; nothing can be fetched there). Installs nothing
# from the internet: it uses what scripts/gpu-prepare.sh put in .gpu-carry/ (run that HERE first,
# then make the device call with carry [".gpu-carry"]):
#
#     OUT=<folder> bash scripts/gpu-check.sh
#
# Steps, each bounded by `timeout` and logged to $OUT/<step>.log, all inside ~8 minutes:
#   python   pick the interpreter that has torch (CUDA build preferred)
#   install  a venv over it (--system-site-packages, so torch/onnx/onnxruntime/cupy/nvidia-ml-py stay
#            visible) with the carried wheels (pip --no-index --find-links), serve-kit from this tree
#   env      $OUT/env.txt: nvidia-smi, Python/torch/CUDA/cuDNN/ONNX Runtime versions, packages
#   pytest   the GPU tests (pytest -m gpu), $OUT/pytest-gpu.xml (JUnit) and $OUT/pytest.log
#   bench    benchmarks/gpu_bench.py: $OUT/gpu_bench.md and $OUT/gpu_bench.json
# then $OUT/summary.md (also printed). Always exits 0 once the summary is written; failed steps are
# named in it and on stdout.
#
# Dry run anywhere (a CPU machine): GPU_CHECK_PYTHON=/work/main/.venv/bin/python OUT=/tmp/gpucheck
# bash scripts/gpu-check.sh  -- uses that interpreter as it is (no venv, no install); the GPU tests
# skip with their reasons and every GPU row of the table says why it is unavailable.
#
# Environment: OUT (default /tmp/gpu-check-out), GPU_CHECK_PYTHON (use this interpreter as is),
# GPU_CHECK_BASE_PYTHON (build the venv over this one instead of searching), GPU_CHECK_NO_VENV=1
# (test the fallback: wheels into a folder on PYTHONPATH, as where `python -m venv` fails), GPU_CHECK_CARRY
# (default .gpu-carry), GPU_CHECK_DEADLINE_S (whole script, default 470).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CARRY=${GPU_CHECK_CARRY:-$ROOT/.gpu-carry}
WHEELS=$CARRY/wheels
PREPARED=$CARRY/prepared
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
T_START=$(date +%s)
DEADLINE=$((T_START + ${GPU_CHECK_DEADLINE_S:-470}))
# Same requirements as REQUIREMENTS in scripts/gpu-prepare.sh (pyproject's ranges): a package the
# device already has in range is kept, only what is missing or too old comes from the wheels.
REQUIREMENTS=(
  "typer>=0.29,<1" "rich>=13.7,<16" "pydantic>=2.7,<3" "pyyaml>=6.0,<7" "orjson>=3.10,<4"
  "httptools>=0.6,<1" "uvloop>=0.19,<1" "hdrhistogram>=0.10,<0.11" "pytest>=8,<10" "safetensors>=0.4,<1"
)
GPU_TESTS=(tests/runtime/test_gpu_backends.py tests/test_tensorrt_target.py tests/bench/test_bench_gpu.py
           tests/test_modelopt.py tests/test_targets.py)
# The tests' small models train on scikit-learn's digits; the device has no scikit-learn.
export SERVE_KIT_TEST_DIGITS_NPZ=$CARRY/prepared/sklearn_digits.npz
STEPS_FILE=$OUT/steps.tsv
: > "$STEPS_FILE"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

say() { echo "[gpu-check $(date +%H:%M:%S)] $*"; }

if ! command -v timeout > /dev/null 2>&1; then  # coreutils' timeout missing: run unbounded, say so
  echo "[gpu-check] WARNING: no \`timeout\` command here; steps run without their time limits"
  timeout() { [ "$1" = "-k" ] && shift 2; shift; "$@"; }
  export -f timeout
fi

# record NAME STATUS SECONDS NOTE
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS_FILE"; }

# run_step NAME LIMIT_S CMD...: run with a timeout (cut to what the deadline leaves), log to $OUT/NAME.log
run_step() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - $(date +%s) - 15))
  if [ "$left" -lt 20 ]; then
    say "$name: skipped, the script's time budget is used up"
    record "$name" skipped 0 "time budget used up"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0 rc status note
  t0=$(date +%s)
  say "$name: start (limit ${limit}s, log $OUT/$name.log)"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok; note="" ;;
    124|137) status=timeout; note="killed after ${limit}s" ;;
    *) status=failed; note="exit $rc" ;;
  esac
  record "$name" "$status" "$(( $(date +%s) - t0 ))" "$note"
  say "$name: $status${note:+ ($note)} in $(( $(date +%s) - t0 ))s"
  if [ "$status" != ok ]; then tail -n 15 "$OUT/$name.log" | sed 's/^/    /'; fi
  return $rc
}

# ---------------------------------------------------------------------------------------------
# python: which interpreter

probe_py() {  # prints "major.minor machine torch cuda" or fails
  "$1" - <<'EOF' 2>/dev/null
import platform, sys
try:
    import torch
    t, c = torch.__version__, torch.version.cuda or "none"
except Exception:
    t, c = "none", "none"
print(f"{sys.version_info[0]}.{sys.version_info[1]} {platform.machine()} {t} {c}")
EOF
}

pick_python() {
  if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    PY=$GPU_CHECK_PYTHON; echo "GPU_CHECK_PYTHON=$PY: used as it is"; probe_py "$PY"; return
  fi
  local best="" best_rank=0 c p info rank
  for c in ${GPU_CHECK_BASE_PYTHON:-} python3.12 python3 python /usr/bin/python3 /usr/local/bin/python3 \
           /opt/conda/bin/python /usr/local/bin/python3.12; do
    p=$(command -v "$c" 2>/dev/null) || continue
    info=$(probe_py "$p") || continue
    echo "$p: $info"
    rank=1
    case "$info" in *" none none") ;; *" none") rank=2 ;; *) rank=3 ;; esac
    [ -n "${GPU_CHECK_BASE_PYTHON:-}" ] && [ "$c" = "$GPU_CHECK_BASE_PYTHON" ] && rank=9
    if [ "$rank" -gt "$best_rank" ]; then best=$p; best_rank=$rank; fi
  done
  [ -n "$best" ] || { echo "no Python interpreter found"; return 1; }
  PY=$best
  echo "chosen: $PY"
}

if run_step python 30 bash -c "$(declare -f probe_py pick_python); pick_python; echo \"PY=\$PY\" > '$WORK/py.env'"; then
  # shellcheck disable=SC1091
  . "$WORK/py.env"
else
  PY=$(command -v python3 || command -v python)
fi
say "python: $PY"
PYX=$PY          # the interpreter the tests and the bench run with
INSTALL_MODE="none"

# ---------------------------------------------------------------------------------------------
# install: the carried wheels, in a venv over $PY (or a --target folder where no venv can be made)

install_carried() {
  set -u
  local venv=$WORK/venv site pyx mode pip_args
  echo "== venv over $PY (--system-site-packages, --without-pip: pip comes from the base interpreter)"
  if [ -z "${GPU_CHECK_NO_VENV:-}" ] && "$PY" -m venv --system-site-packages --without-pip "$venv"; then
    pyx=$venv/bin/python
    site=$("$pyx" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    # The base interpreter's own site dirs: when it is itself a venv, --system-site-packages would
    # show only ITS base's packages (not torch). And this checkout, so serve_kit imports everywhere.
    "$PY" -c 'import sys; print("\n".join(p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))))' \
        > "$site/_gpu_check_base.pth"
    echo "$ROOT" >> "$site/_gpu_check_base.pth"
    echo "--- $site/_gpu_check_base.pth"; cat "$site/_gpu_check_base.pth"
    mode="venv $venv over $PY"
    pip_args=()            # installs only what is missing or out of range
    extra_path=""
  else
    echo "== no venv here: the wheels go to a folder put first on PYTHONPATH instead (all of them)"
    pyx=$PY
    site=$WORK/site
    mkdir -p "$site"
    mode="--target $site on PYTHONPATH, over $PY"
    pip_args=(--target "$site")
    extra_path=$site
  fi
  echo "== pip install --no-index --find-links $WHEELS"
  if PYTHONPATH="$extra_path" "$pyx" -m pip --version \
     && env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_REQUIREMENT PIP_CONFIG_FILE=/dev/null \
        PYTHONPATH="$extra_path" "$pyx" -m pip install --no-index --find-links "$WHEELS" "${pip_args[@]}" \
          --disable-pip-version-check --no-cache-dir --no-warn-script-location --no-input "${REQUIREMENTS[@]}"; then
    mode="$mode, carried wheels installed with pip"
  else
    echo "== pip unusable here or the resolution failed: unpacking every carried wheel into $site instead"
    "$pyx" - "$WHEELS" "$site" <<'EOF' || return 1
import sys, zipfile
from pathlib import Path
wheels, site = Path(sys.argv[1]), Path(sys.argv[2])
for w in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(w) as z:
        z.extractall(site, [n for n in z.namelist() if not n.split("/", 1)[0].endswith(".data")])
    print("unpacked", w.name)
EOF
    mode="$mode, carried wheels unpacked"
  fi
  if [ "$pyx" != "$PY" ]; then
    # The console script the bench tests run (`serve-kit` next to the interpreter), for this checkout.
    printf '#!%s\nimport sys\nfrom serve_kit.cli import main\nsys.exit(main())\n' "$pyx" > "$(dirname "$pyx")/serve-kit"
    chmod +x "$(dirname "$pyx")/serve-kit"
  else
    mode="$mode (no serve-kit console script next to $PY: the bench tests that run it fail)"
  fi
  printf 'PYX=%q\nEXTRA_PYTHONPATH=%q\nINSTALL_MODE=%q\n' "$pyx" "$extra_path" "$mode" > "$WORK/install.env"
  echo "== imports (the carried ones must work; the device's own are only reported)"
  PYTHONPATH="$extra_path${extra_path:+:}$ROOT" "$pyx" - <<'EOF'
import importlib
bad = []
for m in ("serve_kit", "serve_kit.cli", "pydantic", "typer", "rich", "yaml", "orjson", "hdrh", "pytest",
          "safetensors", "numpy", "onnx", "onnxruntime", "torch", "pynvml"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:14s} {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
    except Exception as e:
        carried = m not in ("numpy", "onnx", "onnxruntime", "torch", "pynvml")
        if carried:
            bad.append(m)
        print(f"{m:14s} MISSING ({'carried' if carried else 'the device'}): {type(e).__name__}: {e}")
raise SystemExit(1 if bad else 0)
EOF
}

EXTRA_PYTHONPATH=""
tag=$("$PY" -c 'import platform, sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")' 2>/dev/null)
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  INSTALL_MODE="none: GPU_CHECK_PYTHON given, its environment used as it is"
  record install skipped 0 "$INSTALL_MODE"
elif [ ! -d "$WHEELS" ]; then
  INSTALL_MODE="none: no $WHEELS (run scripts/gpu-prepare.sh and carry .gpu-carry)"
  record install skipped 0 "$INSTALL_MODE"
elif [ "$tag" != "cp312-x86_64" ]; then
  INSTALL_MODE="none: the carried wheels are cp312 x86_64, $PY is $tag; its environment used as it is"
  record install skipped 0 "$INSTALL_MODE"
else
  export PY WORK WHEELS ROOT
  REQS_STR=$(printf '%q ' "${REQUIREMENTS[@]}")
  run_step install 90 bash -c "REQUIREMENTS=($REQS_STR); $(declare -f install_carried); install_carried"
  rc=$?
  if [ -f "$WORK/install.env" ]; then
    # shellcheck disable=SC1091
    . "$WORK/install.env"
    [ "$rc" = 0 ] || INSTALL_MODE="$INSTALL_MODE; INCOMPLETE (see install.log)"
  else
    INSTALL_MODE="failed (see install.log); $PY used as it is"
  fi
fi
say "install: $INSTALL_MODE"
export PYTHONPATH="$EXTRA_PYTHONPATH${EXTRA_PYTHONPATH:+:}$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ---------------------------------------------------------------------------------------------
# env

env_report() {
  echo "== date"; date -u +%Y-%m-%dT%H:%M:%SZ
  echo "== host"; uname -a; echo "cpus: $(nproc 2>/dev/null)"; (free -g 2>/dev/null | head -2) || true
  echo "== interpreter: $PYX (install: $INSTALL_MODE)"
  echo "== nvidia-smi"; timeout 20 nvidia-smi 2>&1 || echo "(nvidia-smi failed or missing)"
  timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm,compute_cap \
      --format=csv 2>&1 || true
  echo "== versions"
  timeout 60 "$PYX" - <<'EOF' 2>&1
import platform, sys
print("python", sys.version.replace("\n", " "), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
          torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device 0", p.name, f"cc {p.major}.{p.minor}", f"{p.total_memory / 2**30:.1f} GiB",
              "bf16", torch.cuda.is_bf16_supported())
except Exception as e:
    print("torch: not usable:", type(e).__name__, e)
for m in ("onnx", "onnxruntime", "triton", "cupy", "pynvml", "tensorrt", "numpy", "safetensors", "modelopt",
          "sklearn", "transformers"):
    try:
        mod = __import__(m)
        extra = ""
        if m == "onnxruntime":
            extra = " providers " + ",".join(mod.get_available_providers())
        print(f"{m} {getattr(mod, '__version__', '?')}{extra}")
    except Exception as e:
        print(f"{m}: not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
try:
    from serve_kit.gpu import cuda_unavailable_reason, ort_provider_unavailable_reason, tensorrt_unavailable_reason
    print("serve_kit: cuda", cuda_unavailable_reason() or "usable", "| TensorRT", tensorrt_unavailable_reason() or "usable",
          "| ORT CUDA EP", ort_provider_unavailable_reason("CUDAExecutionProvider") or "usable")
except Exception as e:
    print("serve_kit.gpu: not importable:", type(e).__name__, e)
EOF
  echo "== installed distributions (pip freeze equivalent, from importlib.metadata)"
  timeout 60 "$PYX" - <<'EOF' 2>&1
from importlib import metadata
seen = {}
for d in metadata.distributions():
    name = d.metadata["Name"]
    if name and name.lower() not in seen:
        seen[name.lower()] = f"{name}=={d.version}    # {d.locate_file('')}"
print("\n".join(v for _, v in sorted(seen.items())))
EOF
  echo "== sys.path"; "$PYX" -c 'import sys; print("\n".join(sys.path))'
}
export PYX INSTALL_MODE
run_step env 60 bash -c "$(declare -f env_report); env_report"
mv -f "$OUT/env.log" "$OUT/env.txt" 2>/dev/null

# ---------------------------------------------------------------------------------------------
# pytest -m gpu

run_step pytest 200 "$PYX" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" \
    "${GPU_TESTS[@]}"

# ---------------------------------------------------------------------------------------------
# bench

run_step bench 200 "$PYX" "$ROOT/benchmarks/gpu_bench.py" --prepared "$PREPARED" --out "$OUT" --budget-s 130

# ---------------------------------------------------------------------------------------------
# summary

SUMMARY_PY=$PYX
"$SUMMARY_PY" -c 'import sys' 2>/dev/null || SUMMARY_PY=$PY
"$SUMMARY_PY" - "$OUT" "$PYX" "$INSTALL_MODE" "$(( $(date +%s) - T_START ))" <<'EOF' || {
import sys, datetime, os
import xml.etree.ElementTree as ET
from pathlib import Path

out, pyx, install, total = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
lines = [f"# GPU check ({datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')})", "",
         f"- interpreter: {pyx}", f"- install: {install}", f"- total: {total} s", ""]
gpu = "—"
env = out / "env.txt"
if env.is_file():
    text = env.read_text(errors="replace").splitlines()
    for i, ln in enumerate(text):
        if ln.startswith("name, driver_version") and i + 1 < len(text):
            gpu = text[i + 1]
        if ln.startswith("serve_kit: cuda"):
            lines.append(f"- {ln}")
lines.insert(2, f"- GPU (nvidia-smi): {gpu}")
lines += ["", "| step | status | seconds | note |", "|---|---|---|---|"]
failed = []
for row in (out / "steps.tsv").read_text().splitlines():
    name, status, secs, note = (row.split("\t") + ["", "", "", ""])[:4]
    lines.append(f"| {name} | {status} | {secs} | {note} |")
    if status not in ("ok", "skipped"):
        failed.append(name)
lines.append("")
junit = out / "pytest-gpu.xml"
if junit.is_file():
    try:
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        t = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        passed = t["tests"] - t["failures"] - t["errors"] - t["skipped"]
        lines += [f"## pytest -m gpu: {passed} passed, {t['failures']} failed, {t['errors']} errors, "
                  f"{t['skipped']} skipped", ""]
        skips: dict[str, int] = {}
        for case in root.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            for tag in ("failure", "error"):
                for el in case.findall(tag):
                    msg = (el.get("message") or "").strip().splitlines()
                    lines.append(f"- {tag.upper()} {name}: {msg[0][:300] if msg else ''}")
            for el in case.findall("skipped"):
                reason = (el.get("message") or "").strip()
                skips[reason] = skips.get(reason, 0) + 1
        if skips:
            lines += ["", "Skipped, by reason:"] + [f"- {n} x {r}" for r, n in sorted(skips.items())]
        lines.append("")
    except Exception as e:  # noqa: BLE001
        lines += [f"pytest-gpu.xml unreadable: {e}", ""]
else:
    lines += ["## pytest -m gpu: no JUnit file (see pytest.log)", ""]
bench = out / "gpu_bench.md"
if bench.is_file():
    md = bench.read_text()
    lines += ["## Bench (gpu_bench.md)", ""] + ["#" + l if l.startswith("# ") else l for l in md.splitlines()]
else:
    lines += ["## Bench: gpu_bench.md was not written (see bench.log)", ""]
lines += ["", "Files: " + ", ".join(sorted(p.name for p in out.iterdir() if p.is_file())),
          "", "FAILED STEPS: " + (", ".join(failed) if failed else "none")]
(out / "summary.md").write_text("\n".join(lines) + "\n")
EOF
  echo "# GPU check: the summary could not be written by Python; see the logs in $OUT" > "$OUT/summary.md"
  cat "$OUT/steps.tsv" >> "$OUT/summary.md"
}
rm -rf "$WORK"
# On the console the bench table first and the steps and test results last (a caller that keeps
# only the tail of the output still sees them); summary.md has everything.
echo
[ -f "$OUT/gpu_bench.md" ] && cat "$OUT/gpu_bench.md"
echo
sed '/^## Bench/,/^Files: /{/^Files: /!d}' "$OUT/summary.md"
echo
failed=$(awk -F'\t' '$2 != "ok" && $2 != "skipped" {print $1}' "$STEPS_FILE" | tr '\n' ' ')
say "done in $(( $(date +%s) - T_START ))s; results in $OUT; failed steps: ${failed:-none}"
exit 0

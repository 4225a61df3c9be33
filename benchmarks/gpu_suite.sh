#!/usr/bin/env bash
# GPT throughput suite for a bare GPU host, in at most --budget-s seconds (default 450, under 8 min).
#
# Prints one JSON object (also written to $OUT/gpu_suite.json when $OUT is set) with tokens/s and MFU
# (nanoGPT's formula, benchmarks/gpt_throughput.py) of `--preset` (default gpt2_small, block 1024),
# bf16 on CUDA:
#   torch      the bare model (autocast bf16, fused AdamW), SDPA and flash-attn (where importable),
#              torch.compile off and on;
#   deepspeed  the same model in a single-process DeepSpeed engine (ZeRO 0), compile off and on;
#   megaray    `megaray train`'s loop: fit() with one Ray Train worker on one GPU, tracking off,
#              on stdlib shards prepared here (`megaray prepare text`, offline).
# plus megaray_over_deepspeed (target >= 0.97) and deepspeed_over_torch; the fp16 (DeepSpeed's loss
# scaler; torch: autocast + GradScaler) and ZeRO-Offload (optimizer states in CPU memory, ZeRO 2)
# sides with their ratio to the main precision (<side>_fp16_over_bf16, <side>_offload_over_bf16); and under "dit" the
# training steps/s of DiT-XL/2 at batch 128 on 32x32x4 latents (256x256 images), bf16 autocast,
# fused AdamW (benchmarks/dit_throughput.py, megaray's DiT; fast-DiT reports 0.84 steps/s on one
# A100), with --dit-preset / --dit-batch-size to change it (on --device cpu: tiny, batch 4).
#
# The host has Python 3.12 + torch but no deepspeed, ray, pydantic, mlflow: prepare wheels first,
# with network, on this side:  benchmarks/gpu-wheels.sh --ray   (fills .whl, .whl2; see it for the
# two transfers). Here .whl/*.whl (and the ray wheel joined from /root/stash/ray.part.aa +
# .whl/ray.part.ab) are installed into /tmp/site, which goes first on PYTHONPATH.
#
# DeepSpeed's fused AdamW (deepspeed and megaray sides on CUDA) is JIT-built on first use and needs
# nvcc (CUDA_HOME); the JSON's "nvcc" says whether the host had one, a side that failed says why
# under "errors", and the other sides' figures are kept.
#
#   bash benchmarks/gpu_suite.sh                                   # on the GPU host
#   bash benchmarks/gpu_suite.sh --device cpu --preset debug --no-install --simulate-bare --steps 3   # proof on CPU
# --simulate-bare makes what the bare host lacks and the wheels do not carry (mlflow, soundfile,
# optuna, matplotlib) unimportable, here and in Ray's workers, so a CPU proof catches such imports.
set -euo pipefail
device=cuda preset=gpt2_small batch=16 steps=20 warmup=3 budget=450 install=1 precision= simulate=0
dit_preset= dit_batch=
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --preset) preset=$2; shift 2 ;;
    --batch-size) batch=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --budget-s) budget=$2; shift 2 ;;
    --precision) precision=$2; shift 2 ;;
    --no-install) install=0; shift ;;
    --simulate-bare) simulate=1; shift ;;
    --dit-preset) dit_preset=$2; shift 2 ;;
    --dit-batch-size) dit_batch=$2; shift 2 ;;
    *) echo "gpu_suite.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$precision" ] || { [ "$device" = cuda ] && precision=bf16 || precision=fp32; }
[ -n "$dit_preset" ] || { [ "$device" = cuda ] && dit_preset=DiT-XL/2 || dit_preset=tiny; }
[ -n "$dit_batch" ] || { [ "$device" = cuda ] && dit_batch=128 || dit_batch=4; }
t_start=$(date +%s)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=${SUITE_DIR:-/tmp/gpu_suite}
mkdir -p "$work"
left() { echo $(( budget - ($(date +%s) - t_start) )); }
log() { echo "[gpu_suite $(( $(date +%s) - t_start ))s] $*" >&2; }

# 1. wheels carried from benchmarks/gpu-wheels.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$install" = 1 ] && [ -d .whl ]; then
  extra=()
  if [ -f .whl/ray.part.ab ] && [ -f /root/stash/ray.part.aa ]; then
    cat /root/stash/ray.part.aa .whl/ray.part.ab > /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
    extra=(/tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl)
  fi
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl "${extra[@]}" >&2
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
  log "installed $(ls .whl/*.whl | wc -l) wheels ${extra[*]:+and ray}"
fi
if [ "$simulate" = 1 ]; then
  mkdir -p "$work/bare_sim"
  cat > "$work/bare_sim/sitecustomize.py" <<'PYEOF'
import sys
BLOCKED = {"mlflow", "soundfile", "optuna", "matplotlib"}
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (gpu_suite --simulate-bare)", name=name)
sys.meta_path.insert(0, _Blocker())
PYEOF
  export PYTHONPATH="$work/bare_sim:$PYTHONPATH"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false RAY_TRAIN_V2_ENABLED=1
[ "$device" = cpu ] && export DS_ACCELERATOR=cpu

# 2. fail fast, naming what is missing, before any minute is spent on a benchmark
$PY - "$device" >&2 <<'PYEOF'
import importlib, sys
need = ["torch", "deepspeed", "ray", "ray.train.torch", "pydantic", "tokenizers", "pyarrow", "typer",
        "megaray.train.launch", "megaray.train.loop", "megaray.data.text"]
missing = []
for m in need:
    try:
        importlib.import_module(m)
    except Exception as e:
        missing.append(f"{m} ({type(e).__name__}: {e})")
if missing:
    sys.exit("gpu_suite: cannot import " + "; ".join(missing) + " -- prepare wheels with benchmarks/gpu-wheels.sh --ray")
import torch
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_suite: --device cuda but torch sees no GPU")
print("imports ok; torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PYEOF

common=(--preset "$preset" --device "$device" --precision "$precision" --batch-size "$batch"
        --steps "$steps" --warmup "$warmup" --runs-jsonl "$work/runs.jsonl")
rm -f "$work/runs.jsonl" "$work/dit.json"
bench() {  # bench SECONDS_TO_KEEP NAME ARGS...: one gpt_throughput.py call within the budget
  local keep=$1 name=$2; shift 2
  local t=$(( $(left) - keep ))
  if [ "$t" -lt 20 ]; then log "$name skipped: budget spent"; return; fi
  timeout "$t" $PY benchmarks/gpt_throughput.py "${common[@]}" "$@" > "$work/$name.json" \
    || log "$name ended early (rc $?); its finished runs are kept"
  log "$name done"
}
# 3. the reference figures first: bare model and DeepSpeed engine, SDPA, no compile
bench 240 reference --sides torch deepspeed --attention sdpa --compile off
# 4. megaray's loop: fit() through Ray Train on one device, on stdlib shards prepared here (offline)
# a 512-token BPE: the most windows from the small corpus (gpt2_small's 40 steps x 16 x 1024 tokens
# stay inside one epoch); the model's vocab_size, and so its compute, is the preset's
vocab=512
if [ ! -f "$work/stdlib-$vocab/manifest.json" ]; then
  $PY -m megaray.cli prepare text --source stdlib --out "$work/stdlib-$vocab" --vocab-size "$vocab" --val-fraction 0.1 --overwrite >&2
fi
bench 100 megaray --sides megaray --attention sdpa --compile off --shards "$work/stdlib-$vocab"
# 4b. DiT training steps/s (megaray's DiT alone: the bare host has no diffusers)
t=$(( $(left) - 50 ))
if [ "$t" -ge 20 ]; then
  timeout "$t" $PY benchmarks/dit_throughput.py --preset "$dit_preset" --batch-size "$dit_batch" --device "$device" \
    --precision "$precision" --sides megaray --steps 10 --warmup 3 --rounds 1 --out "$work/dit.json" > /dev/null \
    || log "dit ended early (rc $?)"
  log "dit done"
else
  log "dit skipped: budget spent"
fi
# 5. variants with what is left: fp16 (DeepSpeed's loss scaler) and ZeRO-Offload of the optimizer
# (train.precision fp16, train.offload optimizer), torch.compile, then flash-attn (skipped where not
# importable)
bench 120 fp16 --sides torch deepspeed megaray --attention sdpa --compile off --precision fp16 --shards "$work/stdlib-$vocab"
bench 90 offload --sides deepspeed megaray --attention sdpa --compile off --zero-stage 2 --offload optimizer --shards "$work/stdlib-$vocab"
bench 50 compile --sides torch deepspeed --attention sdpa --compile on
bench 10 flash --sides torch deepspeed --attention flash --compile off on

# 6. one JSON: the header of the first part, every run that finished
$PY - "$work" "$(( $(date +%s) - t_start ))" <<'PYEOF' | tee "${OUT:-$work}/gpu_suite.json"
import json, os, sys
work = sys.argv[1]
out = {}
for name in ("reference", "megaray", "fp16", "offload", "compile", "flash"):
    try:
        part = json.load(open(os.path.join(work, name + ".json")))
    except Exception:
        continue
    out = out or {k: v for k, v in part.items() if k not in ("runs", "torch", "deepspeed", "megaray", "skipped")}
    out.setdefault("skipped", []).extend(part.get("skipped", []))
path = os.path.join(work, "runs.jsonl")
out["runs"] = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
out["errors"] = [f"{r['side']}/{r['attention']}/compile {r['compile']}: {r['error']}" for r in out["runs"] if "error" in r]
main_precision = out.get("precision")
pick = lambda side, **kw: next((r for r in out["runs"] if r["side"] == side and r["attention"] == "sdpa"
                                and r["compile"] == "off" and "tokens_per_sec" in r
                                and r.get("precision", main_precision) == kw.get("precision", main_precision)
                                and r.get("offload", "none") == kw.get("offload", "none")), None)
for side in ("torch", "deepspeed", "megaray"):
    out[side] = pick(side)
if out["deepspeed"] and out["megaray"]:
    out["megaray_over_deepspeed"] = out["megaray"]["tokens_per_sec"] / out["deepspeed"]["tokens_per_sec"]
if out["torch"] and out["deepspeed"]:
    out["deepspeed_over_torch"] = out["deepspeed"]["tokens_per_sec"] / out["torch"]["tokens_per_sec"]
# fp16 and offload sides, each beside the main precision's figure of the same side (a ratio)
for label, kw in (("fp16", {"precision": "fp16"}), ("offload", {"offload": "optimizer"})):
    for side in ("torch", "deepspeed", "megaray"):
        r, base = pick(side, **kw), out[side]
        if r:
            out[f"{side}_{label}"] = r
            if base:
                out[f"{side}_{label}_over_{main_precision}"] = r["tokens_per_sec"] / base["tokens_per_sec"]
try:
    dit = json.load(open(os.path.join(work, "dit.json")))
    out["dit"] = {k: dit[k] for k in ("preset", "batch_size", "precision", "latent")}
    out["dit"].update(dit["runs"][0])
    out["dit"]["fast_dit_a100_steps_per_sec"] = 0.84
except Exception as e:
    out["dit"] = {"error": f"no DiT figure ({type(e).__name__}: {e})"}
out["suite_wall_s"] = int(sys.argv[2])
import shutil
# DeepSpeed's fused AdamW (the deepspeed and megaray sides on CUDA) is JIT-built with nvcc
home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
out["nvcc"] = shutil.which("nvcc") or (os.path.join(home, "bin/nvcc") if os.path.exists(os.path.join(home, "bin/nvcc")) else None)
print(json.dumps(out, indent=2))
PYEOF

#!/usr/bin/env bash
# GPU checks of the engine and the loop, one script (about 6-7 minutes on one H200):
#   1. benchmarks/gpu_engine.py at T = 1024, then --seq 4096 --grad-ckpt (engine vs plain: time, peak memory)
#   2. a random-init Llama-3.2-1B-shaped checkpoint built locally (no download), bf16
#   3. 30 steps of `fwsel train model=hf` on it, LoRA r=16 on the seven projections, for
#      ftw, greats, tracin and random: median sec_step and CUDA peak memory per arm
# Everything lands in $OUT (when set) or benchmarks/results/gpu/ (--tiny: a temp dir): one JSON per part, a log, SUMMARY.md.
#
#   bash benchmarks/gpu_check.sh           # on the GPU machine
#   bash benchmarks/gpu_check.sh --tiny    # CPU smoke check of this script with tiny shapes (a minute or two)
# Each part runs under `timeout`; no training run starts after DEADLINE_S seconds (default 500).
set -u
cd "$(dirname "$0")/.."
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
DEST=${OUT:-benchmarks/results/gpu}
[ $TINY = 1 ] && [ -z "${OUT:-}" ] && DEST=${TMPDIR:-/tmp}/fwsel_gpu_check_tiny  # a smoke run never lands in results
mkdir -p "$DEST"
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
MODEL_DIR=${TMPDIR:-/tmp}/fwsel_llama1b_shape$([ $TINY = 1 ] && echo _tiny)
LOG="$DEST/gpu_check.log"
log() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }

if [ $TINY = 1 ]; then
  ENGINE_ARGS=(--tiny)
  TRAIN_ARGS=(device=cpu model.dtype=fp32 steps=3 eval_every=3 target.eval_size=16 batch_size=4)
  export OMP_NUM_THREADS=1
else
  ENGINE_ARGS=(--warmup 1 --repeats 3 --budget-s 90)
  TRAIN_ARGS=(device=cuda model.dtype=bf16 steps=30 eval_every=30 target.eval_size=64 batch_size=8)
fi
log "gpu_check: tiny=$TINY dest=$DEST python=$PY"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee -a "$LOG"

# 1. engine micro-benchmark (each prints one JSON line)
log "engine T=1024"
timeout 150 "$PY" benchmarks/gpu_engine.py "${ENGINE_ARGS[@]}" > "$DEST/engine_T1024.json" 2>> "$LOG" || log "engine T=1024 failed ($?)"
log "engine T=4096 grad-ckpt"
timeout 150 "$PY" benchmarks/gpu_engine.py "${ENGINE_ARGS[@]}" --seq 4096 --grad-ckpt --no-func \
  > "$DEST/engine_T4096_ckpt.json" 2>> "$LOG" || log "engine T=4096 failed ($?)"

# 2. the checkpoint: Llama-3.2-1B's shape (tied head, vocab 128256), random init, the char tokenizer
log "build $MODEL_DIR"
timeout 120 "$PY" - "$MODEL_DIR" "$TINY" <<'EOF' 2>&1 | tee -a "$LOG"
import sys, time, torch
from transformers import AutoModelForCausalLM, LlamaConfig
from fwsel.data.tokenizer import char_tokenizer
path, tiny = sys.argv[1], sys.argv[2] == "1"
t0 = time.time()
tok = char_tokenizer()
shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256) if tiny else dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
cfg = LlamaConfig(**shape, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
with torch.device(dev):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if tiny else torch.bfloat16)
model.save_pretrained(path)
tok.save_pretrained(path)
print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params in {time.time() - t0:.0f} s")
EOF

# 3. 30 steps per arm, in this process order; peak CUDA memory from the same process
PROJ="[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
for SEL in ftw greats tracin random; do
  if [ $SECONDS -gt "${DEADLINE_S:-500}" ]; then  # leave room inside a 10-minute device call
    log "skip train $SEL: ${SECONDS}s used (DEADLINE_S=${DEADLINE_S:-500})"
    continue
  fi
  log "train $SEL"
  timeout 120 "$PY" - "$DEST/train_$SEL" "$SEL" train model=hf "model.name_or_path=$MODEL_DIR" "selector=$SEL" \
    lora.r=16 lora.alpha=32 "lora.target_modules=$PROJ" budget=0.25 progress=false save_model=false \
    "${TRAIN_ARGS[@]}" "hydra.run.dir=$DEST/train_$SEL" <<'EOF' 2>&1 | tail -3 | tee -a "$LOG"
import json, os, sys, torch
from fwsel.cli import main
out, sel, args = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    code = main(args)
except SystemExit as e:
    code = e.code
cuda = torch.cuda.is_available()
os.makedirs(out, exist_ok=True)
peak = {"selector": sel, "exit": code, "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None}
with open(f"{out}/peak.json", "w") as f:
    json.dump(peak, f)
print(json.dumps(peak))
EOF
done

# the summary: median sec_step of steps 6.. per arm, peaks, and the engine JSON lines
"$PY" - "$DEST" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, os, statistics, sys
dest = sys.argv[1]
rows = []
for sel in ("ftw", "greats", "tracin", "random"):
    d = os.path.join(dest, f"train_{sel}")
    try:
        steps = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
        secs = [r["sec_step"] for r in steps if r.get("sec_step") is not None]
        summ = json.load(open(os.path.join(d, "summary.json")))
        peak = json.load(open(os.path.join(d, "peak.json")))
        med = statistics.median(secs[5:] or secs)
        rows.append((sel, summ.get("status"), len(secs), med, peak.get("cuda_peak_gib"), summ.get("target_eval_loss")))
    except (OSError, ValueError, KeyError) as e:
        rows.append((sel, f"missing ({type(e).__name__})", 0, None, None, None))
full = {s: m for s, _, _, m, _, _ in rows}
lines = ["| arm | status | steps | median sec_step | / random | CUDA peak GiB | final target_eval_loss |", "|---|---|---|---|---|---|---|"]
for sel, status, n, med, peak, loss in rows:
    ratio = f"{med / full['random']:.2f}" if med and full.get("random") else "-"
    lines.append(f"| {sel} | {status} | {n} | {med if med is None else round(med, 4)} | {ratio} | {peak} | {loss} |")
eng = []
for name in ("engine_T1024", "engine_T4096_ckpt"):
    try:
        eng.append(f"{name}: " + open(os.path.join(dest, f"{name}.json")).read().strip())
    except OSError:
        eng.append(f"{name}: missing")
text = "# GPU check\n\n" + "\n".join(lines) + "\n\n" + "\n".join(eng) + "\n"
open(os.path.join(dest, "SUMMARY.md"), "w").write(text)
print(text)
EOF
log "gpu_check done"

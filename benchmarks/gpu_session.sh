#!/usr/bin/env bash
# The GPU measurements the README still waits for, in one run of under 10 minutes on one H100 or
# H200, most wanted first, each step under its own time limit so that one overrun costs only itself:
#
#   bash benchmarks/gpu_session.sh OUT [RELEASE_CHECKOUT]
#
#   1. gpu_protocol: fp32 and bf16 at S, B and XL with CUDA graphs, and against the release where
#      RELEASE_CHECKOUT holds a checkout of it (171 s on an H200 on 2026-12-04)
#   2. gpu_protocol --attention-kernel flex: bf16 inference at S and B with every model's attention
#      through FlexAttention, against the default kernels of step 1 (the memory-efficient one ran
#      a stage-0 call of EDT-S/2 in 0.42 ms at batch 256 on the H200, 54 TFLOP/s; attention is
#      about a quarter of EDT-S/2's bf16 inference)
#   3. attention_kernels: EDT-S/2's bf16 attention through each candidate kernel, FlexAttention and
#      cuDNN's beside the memory-efficient one
#   4. gpu_profile: where the bf16 time goes (S inference, S and XL masked steps)
#
# A machine without diffusers gets it from wheels in .whl/ (benchmarks/README.md says how to
# bring them). Writes six files to OUT, as few as a device run brings back: session.log, each
# step's report (protocol.md, protocol_flex.md, attention_kernels.md, profile.md) and
# session.tar.gz (every report, JSON and operator table; the Chrome traces stay out, too large).
# GPU_SESSION_ARGS is added to every step: "--tiny --device cpu" runs the same steps on small
# models without a GPU, as a check.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_session.sh OUT [RELEASE_CHECKOUT]}"
release="${2:-}"
mkdir -p "$out"
log="$out/session.log"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1

if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || { echo "diffusers is missing and .whl/ holds no wheels for it" | tee -a "$log"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

step() {  # step SECONDS NAME ARGS...: one benchmark under a time limit, its output in the log
  local seconds="$1" name="$2"
  shift 2
  echo "== $name (at most ${seconds} s): $*" | tee -a "$log"
  local start=$SECONDS
  # shellcheck disable=SC2086  # GPU_SESSION_ARGS holds several arguments
  timeout "$seconds" python3 -m "$@" ${GPU_SESSION_ARGS:-} 2>&1 | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
}

cuda_graphs=""
if nvidia-smi -L >/dev/null 2>&1; then cuda_graphs="--cuda-graphs"; fi
step 230 protocol benchmarks.gpu_protocol --out "$work/protocol" $cuda_graphs ${release:+--release-code "$release"}
step 110 flex benchmarks.gpu_protocol --out "$work/protocol_flex" --attention-kernel flex --precisions bf16 \
  --sizes S B --measurements inference $cuda_graphs
step 90 attention benchmarks.attention_kernels --out "$work/attention_kernels" --dtypes bf16 --only EDT-S/2
step 130 profile benchmarks.gpu_profile --out "$work/profile"

for report in protocol/protocol.md protocol_flex/protocol.md attention_kernels/attention_kernels.md profile/profile.md; do
  [ -f "$work/$report" ] && cp "$work/$report" "$out/$(dirname "$report").md"
done
tar -czf "$out/session.tar.gz" -C "$work" --exclude=traces . 2>>"$log"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >>"$log" 2>&1 || true

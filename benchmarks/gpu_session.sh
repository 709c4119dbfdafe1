#!/usr/bin/env bash
# The GPU measurements the README still waits for, in one run of under 10 minutes on one H100 or
# H200, most wanted first, each step under its own time limit so that one overrun costs only itself:
#
#   bash benchmarks/gpu_session.sh OUT [RELEASE_CHECKOUT]
#
#   1. protocol: fp32 and bf16 at S, B and XL with CUDA graphs (inference, and EDT's training
#      losses), and against the release where RELEASE_CHECKOUT holds a checkout of it (171 s on an
#      H200 on 2026-12-04, before the graphed training rows)
#   2. protocol_flat_adan: the bf16 masked training steps at S and XL with FlatAdan, eager and
#      with EDT's losses from CUDA graphs, against timm's Adan of step 1 (Adan's sixteen passes
#      are 24 of EDT-XL/2's 92 ms floor; graphs take the launches off the host-paced S step)
#   3. protocol_triton: bf16 inference at S with every model's attention through the one-pass
#      Triton kernel (the AMM in the same pass), against the default kernels of step 1 (the
#      memory-efficient one ran a stage-0 call of EDT-S/2 in 0.42 ms at batch 256 on the H200,
#      54 TFLOP/s; attention is about a quarter of EDT-S/2's bf16 inference)
#   4. protocol_flex: the same with FlexAttention
#   5. profile: where the bf16 time goes (S inference, S and XL masked steps)
#   6. attention_kernels: EDT-S/2's bf16 attention through each candidate kernel, the Triton
#      kernel, FlexAttention and cuDNN's beside the memory-efficient one
#
# A machine without diffusers gets it from wheels in .whl/ (benchmarks/README.md says how to
# bring them). Writes eight files to OUT, as few as a device run brings back: session.log, each
# step's report (protocol.md, protocol_flat_adan.md, protocol_triton.md, protocol_flex.md,
# profile.md, attention_kernels.md) and session.tar.gz (every report, JSON and operator table; the Chrome
# traces stay out, too large), each as soon as its step ends, so that a run cut off keeps what it
# measured; the protocol and the profile rewrite their report after every row, so a step stopped
# by its time limit keeps its rows too. GPU_SESSION_ARGS is added to every step: "--tiny --device
# cpu" runs the same steps on small models without a GPU, as a check (the Triton kernel then
# under Triton's interpreter).
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

step() {  # step NAME SECONDS MODULE ARGS...: one benchmark under a time limit, writing to $work/NAME
  local name="$1" seconds="$2" report
  shift 2
  echo "== $name (at most ${seconds} s): $*" | tee -a "$log"
  local start=$SECONDS
  # shellcheck disable=SC2086  # GPU_SESSION_ARGS holds several arguments
  timeout "$seconds" python3 -m "$@" --out "$work/$name" ${GPU_SESSION_ARGS:-} 2>&1 | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
  for report in "$work/$name"/*.md; do
    [ -f "$report" ] && cp "$report" "$out/$name.md"
  done
  tar -czf "$out/session.tar.gz" -C "$work" --exclude=traces . 2>>"$log"
}

cuda_graphs=""
if nvidia-smi -L >/dev/null 2>&1; then cuda_graphs="--cuda-graphs"; else export TRITON_INTERPRET=1; fi
step protocol 240 benchmarks.gpu_protocol $cuda_graphs ${release:+--release-code "$release"}
step protocol_flat_adan 105 benchmarks.gpu_protocol --flat-adan --precisions bf16 --sizes S XL \
  --measurements train_masked $cuda_graphs
for kernel in triton flex; do
  step "protocol_$kernel" 60 benchmarks.gpu_protocol --attention-kernel "$kernel" --precisions bf16 --sizes S \
    --measurements inference $cuda_graphs
done
step profile 60 benchmarks.gpu_profile
step attention_kernels 40 benchmarks.attention_kernels --dtypes bf16 --only EDT-S/2
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >>"$log" 2>&1 || true

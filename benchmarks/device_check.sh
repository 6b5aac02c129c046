#!/usr/bin/env bash
# The device check for the CUDA kernels: one command, on a lent GPU machine, from the repo root.
#
#   bash benchmarks/device_check.sh
#
# Stages (each under its own timeout, so one hang cannot eat the lease):
#   1. the machine: nvidia-smi, python3, torch, nvcc;
#   2. build trak_fast against the machine's own torch (TORCH_CUDA_ARCH_LIST=9.0), in place;
#      SASS check: tensor-core instructions (HMMA) present in the fast kernel;
#   3. python3 -m trak_fast info; 3b. compute-sanitizer memcheck, racecheck, synccheck on small
#      calls (both strategies, fp16/bf16/strided inputs, a misaligned output);
#   4. in the background, build the peers from their sdists in benchmarks/peers/ (carried, not
#      committed): fast_jl 0.1.3 (its setup.py pins TORCH_CUDA_ARCH_LIST=7.0+PTX, which CUDA 13
#      no longer accepts, so a copy is patched to 9.0 first) and sjlt 0.1.7. Failure is recorded;
#   5. the CUDA tests: pytest -k cuda over tests/ (tests/test_cuda.py and every CUDA-parametrized
#      test elsewhere), JUnit XML and log to $OUT;
#   6. benchmarks/bench_project.py --device cuda (-> bench_project_cuda.py): the fused kernel,
#      generate-then-GEMM and cuBLAS with P materialized side by side; JSON and log to $OUT;
#      6b. benchmarks/bench_pipeline.py --device cuda when time is left (needs traker, stage 3c);
#   7. a short summary, printed last.
# Everything lands in $OUT (default ./device_out). Budget: 9 minutes (DEVICE_CHECK_BUDGET_S=540);
# call it with the run tool's timeout_s=580 and carry=["benchmarks/peers"]. Planned split: build
# ~100 s, sanitizers <= 60 + 40 + 40 s, tests <= 150 s, the benchmark the rest (>= 120 s).
set -u
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T0=$(date +%s)
# The whole script stays inside BUDGET seconds (the run tool's timeout_s should be a bit more):
# each stage's timeout is capped by what is left, keeping a reserve for the later stages.
BUDGET=${DEVICE_CHECK_BUDGET_S:-540}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
cap() { local want=$1 reserve=$2 l; l=$(( $(left) - reserve )); [ $l -lt 30 ] && l=30; echo $(( want < l ? want : l )); }
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
summary=()
note() { summary+=("$*"); stamp "$*"; }

# 1. the machine
stamp "machine"
{ nvidia-smi; $PY --version; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)";
  nvcc --version | tail -2; nproc; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" | grep -E "H100|H200|Driver|torch|release|^[0-9]+$" | head -8

# 2. build
stamp "build"
export TORCH_CUDA_ARCH_LIST=9.0 TRAK_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
# NVCC_APPEND_FLAGS: the ptxas resource report (registers, spills) lands in build.log.
NVCC_APPEND_FLAGS="-Xptxas -v" timeout "$(cap 300 300)" $PY -m pip install --no-build-isolation --no-deps -v -e . \
  > "$OUT/build.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  note "BUILD FAILED (rc=$rc); log: build.log"
  tail -40 "$OUT/build.log"
  exit 1
fi
note "build ok ($(( $(date +%s) - T0 ))s)"
note "ptxas: $(grep -c 'bytes spill stores' "$OUT/build.log") kernels reported, $(grep 'bytes spill stores' "$OUT/build.log" | grep -vc ' 0 bytes spill stores') with spills"
so=$(ls trak_fast/_C*.so 2>/dev/null | head -1)
if [ -n "$so" ] && command -v cuobjdump > /dev/null; then
  timeout 120 cuobjdump --dump-sass "$so" > "$OUT/sass.txt" 2>&1
  note "SASS: $(grep -c HMMA "$OUT/sass.txt") HMMA, $(grep -c -E 'LDL|STL' "$OUT/sass.txt") LDL/STL lines; archs: $(grep -o 'arch = sm_[0-9a-z]*' "$OUT/sass.txt" | sort -u | tr '\n' ' ')"
  # Opcode counts per kernel (the table benchmarks/NOTES_cuda.md compares against).
  timeout 60 $PY benchmarks/sass_stats.py "$OUT/sass.txt" > "$OUT/sass_stats.md" 2>&1 ||
    note "sass_stats failed"
fi

# 3. info
timeout 60 $PY -m trak_fast info > "$OUT/info.txt" 2>&1 || note "trak_fast info failed"
cat "$OUT/info.txt"

# 3b. compute-sanitizer, before the tests, so an out-of-bounds access, a race or a barrier
#     misuse shows up as such rather than as a wrong number. Small calls of every precision and
#     both strategies, with partial tiles, several feature splits, several accumulator flushes
#     (n > 8192), fp16/bf16 and strided inputs (the scalar loader) and a misaligned output
#     (the checked flush). memcheck, then racecheck and synccheck (shared memory and barriers;
#     much slower, so smaller calls). Each tool's time is capped.
if command -v compute-sanitizer > /dev/null; then
  cat > /tmp/trak_fast_sanitize.py <<'PYEOF2'
import itertools, os, sys, torch, trak_fast
big = sys.argv[1] == "big"
shapes = ((130, 260, 9000), (7, 100, 70000)) if big else ((70, 260, 1000),)
# (the GEMM strategy covers bf16 only: other precisions would rerun the fused kernel)
runs = [("fused", "fp32"), ("fused", "tf32"), ("fused", "bf16"), ("gemm", "bf16")]
for (strategy, precision), kind, (B, k, n) in itertools.product(runs, ("rademacher", "gaussian"), shapes):
    os.environ["TRAK_FAST_CUDA_STRATEGY"] = strategy
    base = torch.randn(B, 2 * n + 1, device="cuda")
    half, bf16 = base.half(), base.bfloat16()
    # fp32 16-byte and strided loads; fp16/bf16 16-byte loads, a misaligned fp16 base and
    # strided bf16 (the scalar loader)
    for g in (base[:, :n].contiguous(), base[:, ::2][:, :n], half[:, :n].contiguous(),
              half[:, 1:n + 1], bf16[:, :n].contiguous(), bf16[:, ::2][:, :n]):
        trak_fast.project(g, k, kind=kind, precision=precision)
    buf = torch.zeros(B * k + 1, device="cuda")
    out = buf[1:].view(B, k)  # misaligned by 4 bytes: the checked flush path
    trak_fast.project(base[:, :n], k, kind=kind, precision=precision, out=out)
torch.cuda.synchronize()
print("sanitizer calls done")
PYEOF2
  stamp "memcheck"
  timeout "$(cap 60 360)" compute-sanitizer --tool memcheck --error-exitcode 9 $PY /tmp/trak_fast_sanitize.py big \
    > "$OUT/memcheck.log" 2>&1
  note "memcheck rc=$? ($(grep -c 'Invalid' "$OUT/memcheck.log") invalid accesses; log: memcheck.log)"
  for tool in racecheck synccheck; do
    stamp "$tool"
    timeout "$(cap 40 330)" compute-sanitizer --tool $tool --error-exitcode 9 $PY /tmp/trak_fast_sanitize.py small \
      > "$OUT/$tool.log" 2>&1
    note "$tool rc=$? ($(grep -c -i 'hazard\|error' "$OUT/$tool.log") hazard/error lines; log: $tool.log; rc 124 = timed out)"
  done
fi

# 3c. traker 0.3.2 (pure Python, the trak peer; its sdist travels in benchmarks/peers too): with it
#     the trak-parity test modules collect on the device, and the pipeline benchmark can run.
if ls benchmarks/peers/traker-0.3.2* > /dev/null 2>&1; then
  timeout 60 $PY -m pip install --no-build-isolation --no-deps benchmarks/peers/traker-0.3.2* \
    > "$OUT/peer_traker.log" 2>&1 && note "PEER traker: installed" || note "PEER traker: FAILED"
fi

# 4. peers, built in the background while the tests run
build_peers() {
  local dir=/tmp/trak_fast_peers
  rm -rf "$dir" && mkdir -p "$dir"
  # Both peers include ATen/cuda/CUDAContext.h, which needs cusparse.h & co. A toolkit without
  # the math libraries' headers lacks them; torch's pip packages (nvidia/*) carry them.
  local cuda_inc="${CUDA_HOME:-/usr/local/cuda}/include"
  if [ ! -f "$cuda_inc/cusparse.h" ]; then
    local extra
    extra=$($PY - <<'PYEOF'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
dirs = set()
for root in roots:
    for name in ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h"):
        dirs.update(os.path.dirname(h) for h in glob.glob(os.path.join(root, "**", name), recursive=True))
print(":".join(sorted(dirs)))
PYEOF
)
    echo "cusparse.h not in $cuda_inc; CPATH += ${extra:-nothing found}"
    [ -n "$extra" ] && export CPATH="$extra${CPATH:+:$CPATH}"
  fi
  # The two builds run side by side (each single-file: one core each).
  if [ -f benchmarks/peers/fast_jl-0.1.3.tar.gz ]; then
    ( tar -xzf benchmarks/peers/fast_jl-0.1.3.tar.gz -C "$dir" &&
      sed -i "s/environ\['TORCH_CUDA_ARCH_LIST'\]=\"7.0+PTX\"/environ['TORCH_CUDA_ARCH_LIST']=\"9.0\"/" \
        "$dir/fast_jl-0.1.3/setup.py" &&
      grep -n "TORCH_CUDA_ARCH_LIST" "$dir/fast_jl-0.1.3/setup.py" &&
      timeout 220 $PY -m pip install --no-build-isolation --no-deps "$dir/fast_jl-0.1.3" &&
      echo "PEER fast_jl: installed (arch patched 7.0+PTX -> 9.0)" || echo "PEER fast_jl: FAILED" ) \
      > "$OUT/peer_fast_jl.log" 2>&1 &
  else
    echo "PEER fast_jl: sdist missing (carry benchmarks/peers)"
  fi
  if [ -f benchmarks/peers/sjlt-0.1.7.tar.gz ]; then
    ( timeout 220 $PY -m pip install --no-build-isolation --no-deps benchmarks/peers/sjlt-0.1.7.tar.gz &&
      echo "PEER sjlt: installed" || echo "PEER sjlt: FAILED" ) > "$OUT/peer_sjlt.log" 2>&1 &
  else
    echo "PEER sjlt: sdist missing (carry benchmarks/peers)"
  fi
  wait
  cat "$OUT"/peer_*.log 2>/dev/null | grep PEER
}
stamp "peers (background)"
( cd "$PWD" && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=4 build_peers ) > "$OUT/peers.log" 2>&1 &
peers_pid=$!

# 5. the CUDA tests
stamp "tests"
per_test_timeout=()
$PY -c "import pytest_timeout" 2>/dev/null && per_test_timeout=(--timeout 90)
timeout "$(cap 150 170)" $PY -m pytest -q -rfEs -k "cuda and not index_math" --continue-on-collection-errors \
  -p no:cacheprovider "${per_test_timeout[@]}" --junitxml="$OUT/junit.xml" tests > "$OUT/tests.log" 2>&1
rc=$?
tests_line=$(grep -E "(passed|failed|error)" "$OUT/tests.log" | tail -1)
note "tests rc=$rc: $tests_line"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30

# 6. benchmark (after the peers are built)
wait $peers_pid
note "$(grep PEER "$OUT/peers.log" | tr '\n' ' ')"

stamp "bench"
bench_timeout=$(cap 270 10)
bench_budget=$(( bench_timeout > 60 ? bench_timeout - 30 : 10 ))  # stop starting methods here
stamp "bench: timeout ${bench_timeout}s, budget ${bench_budget}s"
timeout "$bench_timeout" $PY benchmarks/bench_project.py --device cuda \
  --out "$OUT/bench_project_cuda.json" --budget-s "$bench_budget" > "$OUT/bench.log" 2>&1
rc=$?
note "bench rc=$rc ($(( $(date +%s) - T0 ))s total)"

# 6b. the TRAK pipeline against trak 0.3.2 on the GPU, if time is left and traker is installed
if [ "$(left)" -gt 70 ] && $PY -c "import trak" 2> /dev/null; then
  stamp "pipeline bench"
  timeout "$(cap 150 15)" $PY benchmarks/bench_pipeline.py --device cuda \
    --out "$OUT/bench_pipeline_cuda.json" > "$OUT/bench_pipeline.log" 2>&1
  note "pipeline bench rc=$?: $(grep -E '^total' "$OUT/bench_pipeline.log")"
fi

# 7. summary, last
echo
echo "==================== device check summary ===================="
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null
grep -E "^GPU|^torch|CUDA" "$OUT/info.txt" | head -4
for s in "${summary[@]}"; do echo "$s"; done
echo "--- bench (table) ---"
sed -n '/^times in ms/,$p' "$OUT/bench.log" | head -30
[ -s "$OUT/bench.log" ] && ! grep -q "^times in ms" "$OUT/bench.log" && tail -25 "$OUT/bench.log"
echo "files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"

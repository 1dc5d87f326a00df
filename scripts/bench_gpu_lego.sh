#!/usr/bin/env bash
# The lego super-resolution benchmark on the GPU machine (configs/bench-lego-gpu.yaml): x2 and x4 training
# copies, stock splatfacto classic / antialiased, gaussianvae + refinement, the 800 px oracle.
#
# Once, on the CPU machine, from the repo root (.whl/ and data/ are git-ignored):
#   ../shared/gpu/fetch-wheels.sh .whl && cp ../shared/gpu/setup.sh .whl/
#   mkdir -p data && cp -r ../shared/data/lego data/lego
# Then on the GPU machine (carry .whl and data/lego, about 56 MB):
#   bash scripts/bench_gpu_lego.sh [extra gvae-bench flags]
# A call stops starting new work after BENCH_BUDGET_S seconds (default 540, under the 10-minute command limit)
# and exits 75; call it again while the machine is warm and it resumes from outputs/bench-lego. Exit 0: complete.
# results.json, results.md, crops.png, renders/ and logs/ are copied to $OUT/bench-lego when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
[ -f .whl/setup.sh ] || { echo "bench_gpu_lego.sh: .whl/setup.sh is missing; see the top of this script." >&2; exit 2; }
[ -f data/lego/transforms_train.json ] || {
  echo "bench_gpu_lego.sh: data/lego is missing; copy ../shared/data/lego to data/lego and carry it." >&2; exit 2; }
# shellcheck disable=SC1091
source .whl/setup.sh .whl || exit 2
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export NERFSTUDIO_METHOD_CONFIGS="gaussianvae=gvae_ns.method:gaussianvae"

echo "== gsplat CUDA extension (compiles once per machine, ~3.5 min)"
python3 -c "from gsplat.cuda._backend import _C" || exit 2
echo "== ready after $((SECONDS - start)) s"

budget=$(( ${BENCH_BUDGET_S:-540} - (SECONDS - start) ))
python3 -m gvae_ns.bench --config configs/bench-lego-gpu.yaml --output outputs/bench-lego \
  --time-budget-s "$budget" "$@"
rc=$?

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/bench-lego"
  for f in results.json results.md crops.png renders logs; do
    [ -e "outputs/bench-lego/$f" ] && cp -r "outputs/bench-lego/$f" "$OUT/bench-lego/"
  done
fi
echo "== gvae-bench exit code $rc after $((SECONDS - start)) s (0 complete, 75 run again to resume, 1 rows failed)"
exit $rc

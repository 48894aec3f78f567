#!/usr/bin/env bash
# The GPU checks of this project in one call, for a lent GPU machine:
#
#     bash benchmarks/gpu_session.sh OUT_DIR [PART ...]     # default: host_sync step_profile gpu
#
# On one H200 (2026-11-27) host_sync took ~100 s, gpu.py 211 s, marginal_kl ~100 s, and
# step_profile ~90 s with one round before its whole-step run was added (now more: one more short
# run per variant). The limits below add up to 540 s for the default three: one call of under
# 10 minutes, which with a machine's start (0.5-2 minutes) fits 15 minutes of device time but
# leaves no room to run it twice. The step profile goes before gpu.py: it prints its table only at
# its end, and gpu.py writes its table after every section.
#
# Run from the repository root of a bare checkout on the GPU machine (no internet there: the
# package installs from the checkout without its dependencies, which the machine's image has).
# Each part has its own time limit and writes its own file under OUT_DIR, so a part that fails
# or runs out of time leaves the others' results:
#
#   host_sync.log      tests/test_host_sync.py, its CUDA cases with CUDA's sync check armed
#   gpu.md, gpu.log    benchmarks/gpu.py --no-compile: throughput (plain loop, ELBO, GECO, its
#                      compiled update, channels_last; fp32 and bf16), marginal KL, DDP on 2+ GPUs
#   step_profile.log   benchmarks/step_profile.py: host ms and ops of GECO's objective and
#                      callback, and what whole steps cost the device (kernels, busy ms)
#   marginal_kl.log    benchmarks/marginal_kl.py at N = 10,000 and 50,000 on the GPU (not in the
#                      default parts: run it when the estimator changes)
#
# The figures go into README.md's "Benchmarks" and docs/results/gpu/ with the card named.
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR [host_sync gpu step_profile marginal_kl]}
shift
parts=${*:-host_sync step_profile gpu}
known=" host_sync step_profile gpu marginal_kl "
for name in $parts; do
    [[ $known == *" $name "* ]] || { echo "unknown part $name (known:$known)"; exit 2; }
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1 KINETO_LOG_LEVEL=6
{ nvidia-smi -L; python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"; } \
    > "$out/device.txt" 2>&1
cat "$out/device.txt"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$out/pip.log" 2>&1 \
    || echo "pip install -e . failed: see pip.log (the benchmarks still run from the checkout)"

failed=""
part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, print its tail
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most $limit s)"
    timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    local status=$?
    tail -n 25 "$out/$name.log"
    if [ $status -eq 124 ] || [ $status -eq 137 ]; then
        echo "$name: stopped at its $limit s limit"
    fi
    if [ $status -ne 0 ]; then
        echo "$name: exit $status"
        failed="$failed $name"
    fi
}

for name in $parts; do
    case $name in
        host_sync) part host_sync 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_host_sync.py ;;
        gpu) part gpu 240 python3 benchmarks/gpu.py --no-compile --out "$out/gpu.md" ;;
        step_profile) part step_profile 180 python3 benchmarks/step_profile.py --rounds 1 --steps 100 \
            --variants elbo geco_pi geco_pi_compiled ;;
        marginal_kl) part marginal_kl 120 python3 benchmarks/marginal_kl.py --sizes 10000 50000 --device cuda ;;
    esac
done
if [ -n "$failed" ]; then
    echo "failed:$failed"
    exit 1
fi

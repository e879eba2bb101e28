#!/usr/bin/env bash
# One call of the lent GPU machine (docs/benchmarks.md "GPU results"): carry [".whl", ".te"], then
#
#     bash benchmarks/gpu_session.sh [gpu_check flags for phase 2...]
#
# 1. the wheels carried in .whl/ (megatron-core) go into /tmp/site;
# 2. Transformer Engine is built from .te/ into /tmp/te_site (benchmarks/te_install.py) on the CPUs,
#    in the background, while phase 1 times on the GPU our BF16/FP8 rows (each beside the path it
#    replaced: the casts of the weight copies, the FP8 weight-gradient adds, the bf16 SwiGLU between
#    FP8 GEMMs), transformers', the
#    optimizer step alone (bench_optimizer.py) and the FP8 weight-gradient GEMMs (bench_fp8_wgrad.py);
# 3. phase 2, with TE importable: TE's rows, the GPU tests (tests/test_te_fp8.py among them) and the
#    other sections, less those its flags skip (e.g. `--skip profile profile_fp8 kernels`), the
#    profiling run with bf16 parameters (`profile_bf16_params`) last;
# 4. one table of both phases (gpu_check.py --merge).
#
# Results under $OUT (the device tool's folder; else ./gpu_results): run logs, phase1/, phase2/.
set -u
out=${OUT:-gpu_results}
mkdir -p "$out/phase1" "$out/phase2"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "carried wheels failed to install" >&2; exit 1; }
fi
export PYTHONPATH=/tmp/site:.
te_jobs=$(( $(nproc) > 6 ? $(nproc) - 4 : 2 ))  # cores left for phase 1's Python thread
if [ -d .te ]; then
    timeout 420 python3 benchmarks/te_install.py --site /tmp/te_site --jobs "$te_jobs" >"$out/te_install.log" 2>&1 &
    te_pid=$!
fi
timeout 290 python3 benchmarks/gpu_check.py --out "$out/phase1" --variants ours:bf16 ours-cast-copies:bf16 ours:fp8 ours-fp8-wgrad-add:fp8 \
    ours-fp8-unfused-swiglu:fp8 \
    --skip ours_te tests profile profile_fp8 sft dpo kernels profile_bf16_params preflight
if [ -n "${te_pid:-}" ]; then
    wait "$te_pid" && echo "Transformer Engine built" || echo "Transformer Engine build failed: $out/te_install.log"
    tail -3 "$out/te_install.log"
    export PYTHONPATH=/tmp/te_site:$PYTHONPATH
    python3 -c "import importlib.metadata as m, transformer_engine.pytorch; print('transformer_engine', m.version('transformer_engine'))" 2>&1 | tail -2
fi
timeout 290 python3 benchmarks/gpu_check.py --out "$out/phase2" --skip ours transformers optimizer fp8_wgrad "$@"
rm -f "$out"/phase*/trace_*.json.gz  # the device tool returns 8 files at most: logs and JSON first
python3 benchmarks/gpu_check.py --merge "$out/phase1/gpu_check.json" "$out/phase2/gpu_check.json"

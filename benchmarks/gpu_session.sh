#!/usr/bin/env bash
# The GPU runs of one device lease, in the order they belong together; every step is time-boxed and logged, and a
# failing step does not stop the others. Results land in $OUT (or benchmarks/results/ without it).
# Wheels for the device (once, here): ../shared/device/wheels.sh crc32c==2.9.post0   then carry .whl and start with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit; bash benchmarks/gpu_session.sh acceptance
# Modes, each sized to fit one device call (with 15 minutes of device time a session, acceptance first):
#   acceptance        bench_analyze, bench_harvest (writers and durability modes side by side), the writer pipeline
#   tests-kernels     GPU kernel, statistics and harvest-copy tests, then bench_kernels
#   store             bench_store on the GPU host's disk
set -u
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
host=$(hostname)
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "=== $name rc=$? $(date +%T)"; tail -n 25 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
df -h /dev/shm "${TMPDIR:-/tmp}" | tail -n +2  # a child writer's host buffers live in /dev/shm
case "${1:-acceptance}" in
  acceptance)
    step bench-analyze 250 python3 benchmarks/bench_analyze.py --out "$out/analyze-gpu-$host.json"
    # 4 blocks committing at once (the default; 2 and 8 were slower on the H100 host); writeback started early, and
    # the writer in a child process (no GIL shared with the forward pass), each beside the default in one run
    step bench-harvest 240 python3 benchmarks/bench_harvest.py --durability syncfs,writeback --writer threads,process \
      --out "$out/harvest-gpu-$host.json"
    # the same host's writers and disk with the forward pass replaced by launches of tiny CPU ops: whether the
    # harvest's gap to the disk is the writer's or the forward pass's beside it
    step writer-pipeline 70 python3 benchmarks/bench_writer_pipeline.py --images 256 --repeat 1 \
      --out "$out/writer-pipeline-gpu-host-$host.json"
    ;;
  tests-kernels)
    # The GPU-only tests and the code-buffer overflow tests (every Triton variant compiled on the GPU: the whole of
    # test_kernels.py + test_stats.py did not finish in 150 s on the H100 host)
    step gpu-tests 150 python3 -m pytest -q -p no:cacheprovider \
      tests/test_kernels.py::test_triton_on_gpu_never_allocates_tokens_by_latents \
      tests/test_kernels.py::test_overflow_tokens_take_the_fallbacks_own_codes_and_l0 \
      tests/test_kernels.py::test_small_cap_falls_back_instead_of_truncating \
      tests/test_kernels.py::test_codes_cost_one_wait_for_the_gpu \
      tests/test_stats.py::test_a_chunk_waits_for_the_gpu_at_most_twice \
      tests/test_stats.py::test_top_k_and_image_top_wait_for_the_gpu_no_more_than_the_codes_do \
      tests/test_stats.py::test_a_gpu_tasks_sums_cross_in_one_copy \
      tests/test_stats.py::test_the_triton_path_gives_the_same_statistics
    step gpu-harvest-tests 100 python3 -m pytest -q -p no:cacheprovider tests/test_harvest.py \
      tests/test_process_writer.py -k "micro_batches or pinned_for_the_gpus"
    step bench-kernels 200 python3 benchmarks/bench_kernels.py --out "$out/kernels-gpu-$host.json"
    ;;
  store)
    step bench-store 400 python3 benchmarks/bench_store.py --out "$out/store-gpu-host-$host.json"
    ;;
  *)
    echo "unknown mode $1: acceptance, tests-kernels or store"; exit 2
    ;;
esac

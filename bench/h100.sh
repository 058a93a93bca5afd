#!/usr/bin/env bash
# The README's H100 figures for the record stack, one step at a time; each prints its figures
# and its wall seconds, and keeps a copy in OUT_DIR/<step>.txt (default bench-h100/):
#
#   bash bench/h100.sh machine|train|kernels|eval|dag|jobs|quant [OUT_DIR]
#
#   machine  GPU, driver, torch and CUDA versions, commit (goes at the top of the figures)
#   train    ms/step, tokens/s and MFU, compiled bf16 at seq 2048, then a profiler table
#   kernels  eager, compiled and Triton (model.kernels) MLP and loss steps at record shapes
#   eval     roundtrip, sliding and TTT targets/s on 1 M random tokens
#   dag      the whole DAG of configs/h100x1.yaml on this GPU, timed (goal: about 15 minutes)
#   jobs     after dag: job seconds per stage, a seed's sweep over one eval job
#   quant    after dag: GPTQ seconds for every matrix, artifact bytes, fast vs naive sweep
set -euo pipefail
step=${1:?usage: bash bench/h100.sh machine|train|kernels|eval|dag|jobs|quant [OUT_DIR]}
out=${2:-bench-h100}
mkdir -p "$out"
stack=(config.yaml configs/record-8xh100.yaml configs/h100x1.yaml)
run=results/h100x1

case $step in
  machine)
    cmd=(bash -c 'date -u; git rev-parse HEAD 2>/dev/null || echo "commit: no .git here"
      nvidia-smi -L;
      python -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)"') ;;
  train)
    cmd=(python bench/train_throughput.py --configfile "${stack[@]}" --device cuda --steps 20
         --warmup 5 --profile 3) ;;
  kernels)
    cmd=(python bench/kernels.py) ;;
  eval)
    cmd=(python bench/eval_throughput.py --configfile "${stack[@]}" --device cuda
         --tokens 1048576) ;;
  dag)
    # the preset sits on the record preset; config.yaml comes first by itself
    cmd=(snakemake --cores all --resources gpu=1 --configfile "${stack[@]:1}") ;;
  jobs)
    cmd=(python bench/job_seconds.py "$run") ;;
  quant)
    cmd=(python bench/quant_bytes.py --run-dir "$run/seed42" --data-dir "$run/data"
         --seq-len 2048 --device cuda) ;;
  *)
    echo "bench/h100.sh: unknown step '$step' (machine, train, kernels, eval, dag, jobs or quant)" >&2
    exit 2 ;;
esac
{
  start=$SECONDS
  PYTHONUNBUFFERED=1 "${cmd[@]}"
  echo "bench/h100.sh $step: $((SECONDS - start)) s wall"
} 2>&1 | tee "$out/$step.txt"

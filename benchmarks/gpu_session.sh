#!/usr/bin/env bash
# Every GPU measurement and CUDA check of benchmarks/README.md in one command, for a short lease on a CUDA machine.
#
#   bash benchmarks/gpu_session.sh OUTDIR [STAGE ...]      # default: every stage, in this order
#
# Stages run in order of importance, each under its own time limit, and each writes its JSON and log into OUTDIR as it
# ends, so a lease cut short keeps what finished: SD1.5 and SDXL UNet steps in fp16, eager and compiled (sdlite and
# diffusers); the CUDA checks (benchmarks/cuda_checks.py); a bf16 LoRA training step against diffusers + peft; SD1.5
# txt2img, VAE and text encoding in fp16; bf16 UNet steps; CUDA graphs (reduce-overhead) on the SD1.5 UNet step;
# then the built-in model's training recipe on the GPU.
# A cold torch.compile of the SD1.5 UNet took 46-59 s per process on an H200 (2026-11-28), so the stages together
# outlast one 10-minute call: name the stages to split them across calls. Run from the repository root with sdlite importable (installed, or PYTHONPATH=src) and diffusers, peft installed.
set -u
out=${1:?usage: gpu_session.sh OUTDIR [STAGE ...]}
shift
wanted=" $* "
mkdir -p "$out"
export PYTHONUNBUFFERED=1
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    [[ "$wanted" == "  " || "$wanted" == *" $name "* ]] || return 0
    echo "=== $name ($(date +%T), limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.out" 2>"$out/$name.log"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    tail -n 30 "$out/$name.log"
    cat "$out/$name.out"
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, diffusers, peft; print(torch.__version__, torch.version.cuda, diffusers.__version__, peft.__version__)"
run="python3 -m benchmarks run --suite gpu --measure unet --dtype fp16 --paths eager,compiled"
stage sd15_unet_fp16 300 $run --models sd15 --out "$out/sd15_unet_fp16.json"
stage sdxl_unet_fp16 450 $run --models sdxl --out "$out/sdxl_unet_fp16.json"
stage cuda_checks 160 python3 -m benchmarks.cuda_checks --out "$out/cuda_checks.json"
stage train_bf16 120 python3 -m benchmarks.train_step --device cuda --dtype bf16 --warmup 3 --reps 10 --profile "$out" \
    --json "$out/train_bf16.json"
stage sd15_other_fp16 120 python3 -m benchmarks run --suite gpu --models sd15 --measure txt2img,vae,text \
    --dtype fp16 --paths eager --txt2img-reps 5 --out "$out/sd15_other_fp16.json"
stage unet_bf16 150 python3 -m benchmarks run --suite gpu --models sd15,sdxl --measure unet --dtype bf16 \
    --paths eager --out "$out/unet_bf16.json"
stage sd15_unet_graphs 200 $run --models sd15 --paths compiled --compile-mode reduce-overhead \
    --out "$out/sd15_unet_graphs.json"
# Left-over time: the built-in model's recipe on the GPU (resumable: OUTDIR/shapes.safetensors.state continues it),
# then its quality on the held-out prompts.
stage shapes_train 560 python3 -m sdlite.data.shapes train --out "$out/shapes.safetensors" --device cuda \
    --max-minutes 9
[ -f "$out/shapes.safetensors" ] && stage shapes_eval 60 python3 -m sdlite.data.shapes evaluate \
    "$out/shapes.safetensors" --seeds 4 --device cuda
echo "=== done $(date +%T)"

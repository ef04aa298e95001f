#!/usr/bin/env bash
# Runs the study's trainings in dependency order (transfer runs need the dog and cattle models),
# recording each run's wall time and device next to its outputs. Usage, from the repository root:
#   bash configs/study/run_all.sh [NAME ...]     (default: every run below, skipping finished ones)
set -uo pipefail
cd "$(dirname "$0")/../.."
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
  runs=(dogs-arcface cattle-scratch cattle-scratch-lr003 humans-scratch cattle-from-dogs humans-from-dogs humans-from-cattle humans-from-cattle-lr003
        joint-cattle-humans humans-study-preset dogs-arcface-10 dogs-cosface dogs-triplet joint-dogs-cattle-humans
        cattle-from-dogs-128x64 cattle-scratch-warmup humans-from-cattle-warmup joint-cattle-humans-128x64
        cattle-from-dogs-128x64-freeze2 dogs-arcface-96 cattle-from-dogs96-128x64 dogs-arcface-60 dogs-arcface-60-aug
        cattle-from-dogs-128x64-aug dogs-arcface-112-aug cattle-from-dogs-128x64-lr001 cattle-from-dogs112aug-128x64
        cattle-from-dogs-192x96 dogs-arcface-aug dogs-arcface-112 cattle-from-dogs112-128x64
        dogs-arcface-ids25 dogs-arcface-ids50 dogs-arcface-ids75
        cattle-from-dogs-128x64-ids25 cattle-from-dogs-128x64-ids50 cattle-from-dogs-128x64-ids75
        cattle-from-dogs-256x128 dogs-lite0-frozen dogs-lite0-svdfc dogs-lite2-frozen cattle-lite0-224x112
        dogs-lite0-arcface-224 dogs-lite0-metric dogs-lite2-metric cattle-lite0-metric-224x112
        humans-lite0-frozen humans-lite0-metric dogs-arcface-112-aug-distill dogs-lite0-frozen-imagenet-norm
        dogs-lite2-arcface-224 dogs-lite0-arcface-224-release cattle-lite0-224x112-8ep cattle-from-dogs-lite0-224x112
        cattle-lite2-frozen cattle-from-dogs-128x64-closed cattle-from-dogs-256x128-closed)
fi
python=${PYTHON:-.venv/bin/python}
mkdir -p runs/study
for name in "${runs[@]}"; do
  out=runs/study/$name
  if [ -f "$out/artifacts/done" ]; then echo "skip $name (done)"; continue; fi
  start=$(date +%s)
  "$python" -m training.cli train --resume --config "configs/study/$name.yaml" >> "runs/study/$name.out" 2>&1
  rc=$?
  end=$(date +%s)
  device=$("$python" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU, %d threads" % torch.get_num_threads())')
  printf '{"run": "%s", "rc": %d, "wall_s": %d, "device": "%s"}\n' "$name" "$rc" "$((end - start))" "$device" \
    | tee -a runs/study/times.jsonl
  [ $rc -eq 0 ] && touch "$out/artifacts/done"
done

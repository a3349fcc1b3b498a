#!/usr/bin/env bash
# Issue #24's ablation at the CPU block-size sweep's scale (configs/sweeps/cpu_block_size.yaml:
# 4 layers x 128, 1.6M tokens, 1600 steps of 8 x 128): the cross-entropy NELBO against score
# entropy, each with and without time conditioning, at B = 4 and B = L = 128; eight runs under
# ${ROOT:-runs/ablation_score_entropy}, one after the other (~6 min each on 2 cores). Then
#   cascade runs ${ROOT:-runs/ablation_score_entropy}      # or read each run's metrics.jsonl
set -euo pipefail
ROOT=${ROOT:-runs/ablation_score_entropy}
CASCADE=${CASCADE:-cascade}
common=(data.seq_len=128 train.micro_batch_size=8 train.global_batch_size=8 train.steps=1600
        model.num_layers=4 model.hidden_size=128 model.num_attention_heads=4
        optimizer.warmup_steps=50 optimizer.lr=1e-3 optimizer.min_lr=1e-4
        train.eval_interval=100000 train.eval_batches=64 train.log_interval=100
        checkpoint.interval=1600 tracking.enabled=false)
for block in 4 128; do
  for loss in ce score_entropy; do
    for tc in false true; do
      name=b${block}_${loss}_tc${tc}
      [ -f "$ROOT/$name/checkpoints/latest" ] && continue
      $CASCADE train configs/base.yaml "${common[@]}" run_dir="$ROOT/$name" name="$name" \
        diffusion.block_size=$block diffusion.loss=$loss model.time_conditioning=$tc
    done
  done
done

#!/bin/sh
# The tuned-LR LM table of issue 19 item 6 (run from the repository root; one thread).
# 300 steps, not the 1000: measured on the shared 2-core machine (load average 6-10) the demo LM
# below took ~170 ms a step for AdamW and ~4x that for coap-int8; ~45 runs of 1000 steps did not fit the
# ~80 min of one core this table had.
export OMP_NUM_THREADS=1
exec python -m coap_lab bench quality --dim 128 --layers 2 --ffn 344 --seq-len 64 --steps 300 \
  --eval-every 50 --seeds 0,1,2 --tune-lr --lr-grid 2e-3,4e-3,8e-3 --lr-extend 2 \
  --optimizers adamw,coap,coap-official,galore,galore-torch,apollo-torch,adamw8bit-torchao,coap-int8 \
  --results-dir benchmarks/results/quality_tuned

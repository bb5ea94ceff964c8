#!/bin/sh
# The tuned-LR LM table of issue 19 item 6 (run from the repository root; one thread).
export OMP_NUM_THREADS=1
exec python -m coap_lab bench quality --dim 128 --layers 2 --ffn 344 --seq-len 64 --steps 1000 \
  --eval-every 100 --seeds 0,1,2 --tune-lr --lr-grid 2e-3,4e-3,8e-3 --lr-extend 2 \
  --optimizers adamw,coap,coap-official,galore,galore-torch,apollo-torch,adamw8bit-torchao,coap-int8 \
  --results-dir benchmarks/results/quality_tuned

#!/bin/sh
# The 8-bit rows of the tuned LM table, run after the vision table (see run.sh).
set -e
export OMP_NUM_THREADS=1
R=benchmarks/results/quality_tuned
COMMON="--dim 128 --layers 2 --ffn 344 --seq-len 64 --steps 300 --eval-every 50 --seeds 0,1,2"
q() { name=$1; shift; python -m coap_lab bench quality $COMMON --optimizers "$name" --results-dir "$R/$name" "$@"; }
q coap-int8 --lr 4e-3
q adamw8bit-torchao --lr 2e-3

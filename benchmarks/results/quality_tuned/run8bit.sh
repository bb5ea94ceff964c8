#!/bin/sh
# Run after the vision table (see run.sh): the rest of apollo-torch's grid, then the 8-bit rows.
set -e
export OMP_NUM_THREADS=1
R=benchmarks/results/quality_tuned
COMMON="--dim 128 --layers 2 --ffn 344 --seq-len 64 --steps 300 --eval-every 50 --seeds 0,1,2"
q() { name=$1; shift; python -m coap_lab bench quality $COMMON --optimizers "$name" --results-dir "$R/$name" "$@"; }
# apollo-torch's best was its grid's upper edge (1.6e-2 after --lr-extend 1): the grid goes on from there
# (the first folder is kept as apollo-torch-pass1; quality_tuned_merge.py joins both grids)
mv "$R/apollo-torch" "$R/apollo-torch-pass1"
q apollo-torch --tune-lr --lr-grid 1.6e-2,3.2e-2 --lr-extend 2
q coap-int8 --lr 4e-3
q adamw8bit-torchao --lr 2e-3

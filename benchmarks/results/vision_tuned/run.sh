#!/bin/sh
# The tuned-LR vision table of issue 19 item 6 (run from the repository root; one thread). coap is the
# Tucker row (matrix COAP on the Linear weights, Tucker COAP on the convs above 9216 weights); so is
# coap-official (basis="official"); galore projects matrices only. 300 steps, as the shared-lr table
# (benchmarks/results/vision.json), 3 of its 5 optimizers plus coap-official.
export OMP_NUM_THREADS=1
exec python -m coap_lab bench vision --steps 300 --eval-every 50 --seeds 0,1,2 --tune-lr \
  --lr-grid 1e-3,2e-3,4e-3 --lr-extend 1 --optimizers adamw,coap,coap-official,galore --threads 1 \
  --results-dir benchmarks/results/vision_tuned

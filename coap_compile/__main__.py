"""``python -m coap_compile``: the library has no command line of its own.

The demo and benchmark command line lives in the sibling package ``coap_lab`` (same distribution):
``coap-compile ...`` or ``python -m coap_lab ...``. This stub imports nothing from it.
"""

from __future__ import annotations

import sys

MESSAGE = (
    "coap_compile is the optimizer library and has no command line; the demo and benchmarks are "
    "`coap-compile ...` or `python -m coap_lab ...` (e.g. `coap-compile demo`)"
)

if __name__ == "__main__":
    print(MESSAGE, file=sys.stderr)
    sys.exit(2)

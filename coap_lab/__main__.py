"""``python -m coap_lab``: the same as the ``coap-compile`` console script."""

from __future__ import annotations

import sys

from coap_lab.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

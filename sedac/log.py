"""The package's logger: facts worth one line (what an engine loaded with) go to stderr at INFO, as
vLLM's do. SEDAC_CONFIGURE_LOGGING=0 leaves the "sedac" logger to the application's own setup."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("sedac")
if os.environ.get("SEDAC_CONFIGURE_LOGGING", "1") != "0" and not logger.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

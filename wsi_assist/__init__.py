"""wsi-assist: batch processing of whole-slide images for pathology."""

from __future__ import annotations

import os

# onnxruntime's telemetry writes ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ and
# $TMPDIR/.ses as soon as it is imported; nothing is written outside OUT unless asked
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

__all__ = ["__version__"]

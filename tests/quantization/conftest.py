"""Quantized tiny checkpoints: `quant_checkpoints.py` writes them (this folder is put on
`sys.path`, as the project imports test modules with `--import-mode=importlib`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

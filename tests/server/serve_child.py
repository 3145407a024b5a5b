"""Run `serve_main` from a JSON ServeConfig, as `s3 serve` would: for the process-level tests (SIGTERM, and tensor
parallel under the deepspeed launcher, which needs a module or script to start on every rank).

Usage: python -m tests.server.serve_child '{"engine": {...}, "port": 8000}'
"""

from __future__ import annotations

import json
import sys

from pipeline.cli import load_predictor_checkpoint
from pipeline.config import from_dict
from serve.server.config import ServeConfig
from serve.server.launch import serve_main

if __name__ == "__main__":
    serve_main(from_dict(ServeConfig, json.loads(sys.argv[1])), load_checkpoint=load_predictor_checkpoint)

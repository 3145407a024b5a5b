"""The scheduler, KV accounting, policies, the step loop and the bottom package are CPU bookkeeping: importing
them must not load torch (a fresh interpreter, so other tests' imports do not count)."""

import subprocess
import sys


def test_scheduler_imports_no_torch():
    code = (
        "import sys, core.buckets, core.request, core.distributed, serve.kv, serve.policies, serve.scheduler, "
        "serve.peak, serve.step; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

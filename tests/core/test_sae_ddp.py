"""SAE training under DDP with 2 CPU processes (gloo) matches single-process training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("ddp_sae_script.py")


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    for mode in ("single", "ddp"):
        proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(tmp_path / f"{mode}.json")],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "single.json").read_text())
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert single.keys() == ddp.keys()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        a, b = np.asarray(single[name]), np.asarray(ddp[name])
        np.testing.assert_allclose(b, a, atol=1e-5, err_msg=name)

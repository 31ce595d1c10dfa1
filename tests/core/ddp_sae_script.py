"""Helper for test_sae_ddp: train a TopK SAE in one process (batch 2b) or two DDP processes (b each).

Run as a script (Lightning's DDP launcher re-executes the command for rank 1, so it cannot run
inside pytest's own process). Writes the trained state dict as JSON from rank 0.
"""

import json
import sys

import numpy as np
import torch

from sciscope.core.sae import TopKConfig, train_sae

mode, out = sys.argv[1], sys.argv[2]
X = np.random.default_rng(0).normal(size=(4096, 16)).astype(np.float32)
B = 64


def batches(size: int) -> list[torch.Tensor]:
    return [torch.from_numpy(X[i : i + size]) for i in range(0, len(X) - size + 1, size)]


cfg = TopKConfig(d_in=16, d_sae=32, k=4, normalize="none", aux_coeff=0.0)
if mode == "single":
    # norm_batches picks the same 512 rows for the data-dependent initialisation in both modes
    res = train_sae(cfg, batches(2 * B), max_steps=20, lr=1e-3, seed=0, progress=False, norm_batches=4)
else:
    # rank r takes batches r, r + 2, ...: together each step sees the single run's batch of 2B
    res = train_sae(cfg, batches(B), max_steps=20, lr=1e-3, seed=0, progress=False, norm_batches=8,
                    accelerator="cpu", strategy="ddp", devices=2)
if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
    sys.exit(0)
with open(out, "w") as f:
    json.dump({k: v.detach().numpy().tolist() for k, v in res.sae.state_dict().items()}, f)

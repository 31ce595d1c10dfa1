"""Tiny random-init models shared by the tests (no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def _seed(s: int = 0) -> None:
    torch.manual_seed(s)


@pytest.fixture(scope="session")
def bert():
    from transformers import BertConfig, BertModel

    _seed()
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg).eval()


@pytest.fixture(scope="session")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    _seed()
    cfg = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed()
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


class TinyMLP(nn.Module):
    """A plain PyTorch model: (B, d_in) -> (B, n_out)."""

    def __init__(self, d_in: int = 8, d_hidden: int = 16, n_out: int = 3) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_hidden), nn.ReLU())
        self.head = nn.Linear(d_hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


class TinyConv(nn.Module):
    """A plain conv net over 2-D fields: positions are pixels (B, C, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.fixture()
def mlp():
    _seed()
    return TinyMLP().eval()


@pytest.fixture()
def conv():
    _seed()
    return TinyConv().eval()


@pytest.fixture()
def token_batches():
    """Two batches of token ids with padding (attention_mask zeros at the end of some rows)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        ids = torch.randint(1, 50, (4, 6), generator=g)
        mask = torch.ones(4, 6, dtype=torch.long)
        mask[1, 4:] = 0
        mask[3, 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out

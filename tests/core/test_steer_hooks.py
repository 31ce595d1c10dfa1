"""Our hooks run before the model's own: what a model records (hidden states) is the edited tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sciscope.core import HookSet, Site, capture, clamp, count_hooks, steer


def _tiny_hf(kind: str) -> tuple[nn.Module, str]:
    """A 2-layer, 16-wide randomly initialised Hugging Face model and its first block's path."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                            bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(cfg).eval(), "transformer.h.0"
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16)
        return tf.BertModel(cfg).eval(), "encoder.layer.0"
    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=0, eos_token_id=0)
    return tf.LlamaForCausalLM(cfg).eval(), "model.layers.0"


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_hidden_states_show_the_steered_and_clamped_block(kind: str) -> None:
    model, block = _tiny_hf(kind)
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    v = torch.randn(16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # The first call with output_hidden_states=True is when transformers 5 installs its
        # recording hooks; every later call had our hooks run after them.
        base = model(input_ids=ids, output_hidden_states=True).hidden_states
        with steer(model, v, 2.0, site=block), capture(model, [block]) as cap:
            steered = model(input_ids=ids, output_hidden_states=True).hidden_states
        with clamp(model, block, [3, 7], 5.0):
            clamped = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert count_hooks(model) == 0
    torch.testing.assert_close(steered[1], base[1] + 2.0 * v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steered[1], cap[block])
    assert torch.all(clamped[1][..., [3, 7]] == 5.0)


class _Recording(nn.Module):
    """A model that records its block's input and output with hooks of its own, registered first."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.seen: dict[str, torch.Tensor] = {}
        self.block.register_forward_pre_hook(lambda m, args: self.seen.__setitem__("input", args[0]))
        self.block.register_forward_hook(lambda m, args, out: self.seen.__setitem__("output", out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_model_hooks_see_edits_and_ours_keep_their_order() -> None:
    model = _Recording()
    x = torch.randn(3, 4)
    v = torch.ones(4)
    with torch.no_grad():
        plain = model(x)
        with steer(model, v, 1.0, site="block"):
            model(x)
        torch.testing.assert_close(model.seen["output"], plain + 1.0)
        with steer(model, v, 1.0, site="block:input"):
            model(x)
        torch.testing.assert_close(model.seen["input"], x + 1.0)
        # Among our own hooks, registration order still holds: capture inside steer sees the
        # steered tensor; a second edit applies on top of the first.
        with steer(model, v, 1.0, site="block"), steer(model, v, 2.0, site="block"), capture(model, ["block"]) as cap:
            model(x)
        torch.testing.assert_close(cap["block"][:, 0], plain + 3.0)  # capture gives (B, P, D)
        torch.testing.assert_close(model.seen["output"], plain + 3.0)
        order = []
        with HookSet() as hooks:
            hooks.read(model.block, Site("block"), lambda t: order.append("first"))
            hooks.read(model.block, Site("block"), lambda t: order.append("second"))
            model(x)
        assert order == ["first", "second"]
    assert count_hooks(model) == 0 and len(model.block._forward_hooks) == 1

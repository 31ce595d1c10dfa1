"""A walkthrough of the core toolkit on a small model trained here in seconds.

The model is a 2-layer GPT-2 trained to continue counting sequences in one of two registers:
low numbers 0-9 or high numbers 10-19, counting ``s, s+k, s+2k, ...`` (mod 10 within the
register) with a hidden step ``k`` in {1, 2, 3}. Everything the core does is shown on it, each
analysis beside its control:

1. capture every layer into an ActivationStore;
2. probe every layer for the register, the step and the start, with shuffled-label controls;
3. steer low-register prompts with the (high - low) delta vector, against random directions;
4. train a TopK SAE on per-token activations; associate its features with the concepts;
5. patch clean into corrupted prompts per layer and position;
6. read the steering vector and FFN value vectors through the unembedding (lens).

Run ``python -m sciscope.pipelines.demo --out runs/demo``; tables (CSV) and figures (PNG) land in
the output folder together with ``summary.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

VOCAB = 20  # numbers 0..19: register "low" is 0-9, "high" is 10-19
BOS = VOCAB  # token id 20
STEPS = (1, 2, 3)


def counting_examples(*, lengths: tuple[int, int] = (3, 9), seed: int = 0) -> tuple[pd.DataFrame, list[list[int]]]:
    """Every (register, start, step, length) counting sequence; obs holds the concepts."""
    rows, seqs = [], []
    for high in (False, True):
        for step in STEPS:
            for start in range(10):
                for length in range(lengths[0], lengths[1] + 1):
                    seq = [BOS] + [10 * high + (start + i * step) % 10 for i in range(length)]
                    nxt = 10 * high + (start + length * step) % 10
                    rows.append({"high": high, "step": step, "start": start, "length": length, "next": nxt})
                    seqs.append(seq)
    obs = pd.DataFrame(rows)
    rng = np.random.default_rng(seed)
    obs["split"] = np.where(rng.random(len(obs)) < 0.8, "train", "test")
    return obs, seqs


def pad_batch(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Left-aligned padding with an attention mask (pad id 0, masked out)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def batches_of(seqs: list[list[int]], size: int = 64) -> list[dict[str, torch.Tensor]]:
    return [pad_batch(seqs[i : i + size]) for i in range(0, len(seqs), size)]


def train_counter(seqs: list[list[int]], *, steps: int = 600, seed: int = 0, progress: bool = True) -> nn.Module:
    """A tiny GPT-2 trained by next-token prediction on the counting sequences."""
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB + 1, n_embd=64, n_layer=2, n_head=4, n_positions=16, n_inner=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in tqdm(range(steps), desc="train demo model", disable=not progress):
        batch = pad_batch([seqs[i] for i in rng.integers(0, len(seqs), 64)])
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        labels[:, :2] = -100  # the first number cannot be predicted; the step shows from the second on
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def next_token_accuracy(model: nn.Module, seqs: list[list[int]], obs: pd.DataFrame) -> float:
    with torch.no_grad():
        preds = []
        for b in batches_of(seqs):
            logits = model(**b).logits
            last = b["attention_mask"].sum(1) - 1
            preds.append(logits[torch.arange(len(last)), last].argmax(-1))
    return float((torch.cat(preds).numpy() == obs["next"].to_numpy()).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sciscope-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    run_demo(Path(args.out), seed=args.seed, train_steps=args.train_steps, progress=not args.quiet)
    return 0


def run_demo(out: Path, *, seed: int = 0, train_steps: int = 600, progress: bool = True) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sciscope.core import (
        activation_patching,
        alpha_sweep,
        collect,
        contrast_vector,
        lens,
        unembedding_matrix,
        value_vector_lens,
    )
    from sciscope.core.features import analyze_features
    from sciscope.core.io import write_json, write_table
    from sciscope.core.probe import probe_sweep
    from sciscope.core.sae import TopKConfig, evaluate_sae, train_sae

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"seed": seed}

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:5.1f}s] {msg}", flush=True)

    # -- data and model ---------------------------------------------------------------------------
    obs, seqs = counting_examples(seed=seed)
    train_idx = np.flatnonzero(obs.split == "train")
    model = train_counter([seqs[i] for i in train_idx], steps=train_steps, seed=seed, progress=progress)
    test_idx = np.flatnonzero(obs.split == "test")
    acc = next_token_accuracy(model, [seqs[i] for i in test_idx], obs.iloc[test_idx])
    summary["model"] = {"params": sum(p.numel() for p in model.parameters()), "heldout_next_token_accuracy": acc}
    say(f"model: tiny GPT-2, held-out next-token accuracy {acc:.3f} (chance {1 / VOCAB:.3f})")

    # -- 1. capture ---------------------------------------------------------------------------------
    sites = ["transformer.wte", "transformer.h.0", "transformer.h.1"]
    store = collect(model, batches_of(seqs), sites, out=out / "activations" / "mean", obs=obs,
                    pooling="mean", seed=seed, progress=progress)
    say(f"captured {store.n_obs} examples x {len(sites)} sites (mean over tokens) -> {store.path}")

    # -- 2. probes ------------------------------------------------------------------------------------
    probes = probe_sweep(store, ["high", "step", "start"], cv=5, control=True, seed=seed, progress=progress)
    probes.save(out / "probes")
    summ = probes.summary()
    write_table(out / "probes" / "summary.csv", summ)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, target in zip(axes, ["high", "step", "start"]):
        probes.plot(target, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "probes" / "score_vs_layer.png", dpi=120)
    plt.close(fig)
    summary["probes"] = summ.to_dict(orient="records")
    say("probes (score vs layer, with shuffled-label control):\n" + summ.to_string(index=False))

    # -- 3. steering ----------------------------------------------------------------------------------
    site = "transformer.h.1"
    vec = contrast_vector(store, site, a="high", b="~high")
    low = np.flatnonzero(~obs.high & (obs.split == "test"))
    low_batches = batches_of([seqs[i] for i in low])

    def evaluate(m: nn.Module) -> dict[str, float]:
        """Share of next-token predictions (argmax) in the high register, and still correct counts."""
        with torch.no_grad():
            preds = []
            for b in low_batches:
                logits = m(**b).logits
                last = b["attention_mask"].sum(1) - 1
                preds.append(logits[torch.arange(len(last)), last].argmax(-1))
        p = torch.cat(preds).numpy()
        expected = obs.next.to_numpy()[low]
        return {"predicts high register": float(((p >= 10) & (p < VOCAB)).mean()),
                "count preserved (mod 10)": float((p % 10 == expected % 10).mean())}

    sweep = alpha_sweep(model, vec, [-4.0, 1.0, 2.0, 4.0, 6.0, 8.0], evaluate, n_random=3, seed=seed, progress=progress)
    sweep.save(out / "steering")
    vec.save(out / "steering" / "vector.safetensors")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    sweep.plot("predicts high register", ax=axes[0])
    sweep.plot("count preserved (mod 10)", ax=axes[1])
    fig.tight_layout()
    fig.savefig(out / "steering" / "alpha_sweep.png", dpi=120)
    plt.close(fig)
    eff = sweep.table.pivot_table(index="alpha", columns=["metric", "condition"], values="value")
    summary["steering"] = {"site": site, "vector_norm": vec.norm, "table": sweep.table.round(3).to_dict(orient="records")}
    say("steering low-register prompts with (high - low) at " + site + ":\n" + eff.round(2).to_string())

    # -- 4. sparse autoencoder + features ------------------------------------------------------------
    tokens = collect(model, batches_of(seqs), [site], out=out / "activations" / "tokens", obs=obs,
                     pooling="none", seed=seed, progress=progress)
    cfg = TopKConfig(d_in=tokens.dim(site), d_sae=256, k=8, normalize="scalar")
    epochs = iter(range(10**6))
    data = lambda: tokens.iter_batches(site, batch_size=256, shuffle=True, seed=seed + next(epochs))  # noqa: E731
    trained = train_sae(cfg, data, max_steps=1500, lr=3e-3, seed=seed, progress=progress)
    trained.save(out / "sae")
    sae = trained.sae
    metrics = evaluate_sae(sae, tokens.iter_batches(site, batch_size=1024))
    summary["sae"] = metrics
    say("SAE (topk, 256 latents, k=8): " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()))
    with torch.no_grad():
        acts = torch.cat([sae.encode(b) for b in tokens.iter_batches(site, batch_size=1024)]).numpy()
    tok_obs = tokens.obs.assign(token_value=[seqs[e][p] for e, p in zip(tokens.obs.example, tokens.obs.position)])
    concepts = ["high", "step", "position", "token_value"]
    feats = analyze_features(acts, tok_obs, concepts=concepts, k=5, control=True, seed=seed)
    feats.save(out / "features")
    n_sig = int(feats.associations.significant.sum())
    n_sig_ctrl = int(feats.control_associations.significant.sum())
    summary["features"] = {"significant_associations": n_sig, "significant_on_shuffled_concepts": n_sig_ctrl}
    say(f"features: {n_sig} feature-concept associations pass FDR 0.05 ({n_sig_ctrl} on shuffled concepts)")

    # -- 5. patching ----------------------------------------------------------------------------------
    clean = torch.tensor([[BOS, 14, 16]])  # step 2 -> next is 18
    corrupted = torch.tensor([[BOS, 14, 15]])  # step 1 -> next is 16

    def logit_diff(output: Any) -> float:
        return float(output.logits[0, -1, 18] - output.logits[0, -1, 16])

    patch = activation_patching(model, {"input_ids": clean}, {"input_ids": corrupted},
                                ["transformer.h.0", "transformer.h.1"], logit_diff, per_position=True, progress=progress)
    patch.save(out / "patching")
    ax = patch.plot(position_labels=["all", "BOS", "14", "16 / 15"])
    ax.figure.tight_layout()
    ax.figure.savefig(out / "patching" / "heatmap.png", dpi=120)
    plt.close(ax.figure)
    summary["patching"] = {"clean_logit_diff": patch.clean_score, "corrupted_logit_diff": patch.corrupted_score,
                           "effect": patch.table.round(3).to_dict(orient="records")}
    say("patching clean (14, 16) into corrupted (14, 15), logit(18) - logit(16):\n" + patch.matrix().round(2).to_string())

    # -- 6. lens --------------------------------------------------------------------------------------
    names = [str(i) for i in range(VOCAB)] + ["BOS"]
    top = lens(vec.vector, unembedding_matrix(model), tokens=names, k=5)
    neurons = value_vector_lens(model, "transformer.h.1.mlp.c_proj", tokens=names, k=3, neurons=range(8))
    write_table(out / "lens" / "steering_vector.csv", top)
    write_table(out / "lens" / "ffn_value_vectors_layer1.csv", neurons)
    summary["lens"] = {"steering_vector_top_tokens": top.token.tolist()}
    say("lens: the steering vector's top tokens " + ", ".join(top.token))

    summary["seconds"] = round(time.time() - t0, 1)
    write_json(out / "summary.json", summary)
    say(f"done: tables and figures under {out}/ (summary.json)")
    return summary


if __name__ == "__main__":
    raise SystemExit(main())

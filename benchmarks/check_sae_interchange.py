"""SAE interchange against the real libraries: the same codes on both sides of every conversion.

Directions checked, each on one batch of activation-like inputs at a realistic size:

1. **sciscope -> SAELens.**  A sciscope SAE of each architecture SAELens can run (relu, topk,
   jumprelu, batchtopk) is written with :func:`~sciscope.core.sae.formats.export_saelens` and
   loaded by SAELens' own ``SAE.load_from_disk``; both encode the batch.
2. **SAELens -> sciscope.**  SAELens SAEs (standard with and without ``apply_b_dec_to_input``,
   topk with and without ``rescale_acts_by_decoder_norm``, jumprelu, and a BatchTopK training SAE
   saved by ``save_inference_model``) are written by SAELens' ``save_model`` and loaded by
   :func:`~sciscope.core.sae.load_sae`.
3. **sparsify / dictionary_learning -> sciscope**, when those libraries import (they are not in
   the ``[bench]`` extra: ``pip install --no-deps --target DIR eai-sparsify dictionary-learning
   simple_parsing natsort docstring_parser schedulefree`` and ``PYTHONPATH=DIR``).  Their modules
   write the files (sparsify's ``save_to_disk``; dictionary_learning's ``state_dict`` saved as
   ``ae.safetensors`` with its ``config.json``), and their own ``encode`` is the reference.

Weights are random but shaped like trained ones: decoder rows of norm 0.5 to 2 (so decoder-norm
folds matter), non-zero biases, JumpReLU thresholds at each latent's 99th percentile and a
BatchTopK threshold between the batch's (k * B)-th and (k * B + 1)-th largest activation.  Reported
per case: the largest |code difference|, the largest |code| (for scale) and their ratio, mean L0 on
both sides and the number of entries whose active/inactive state differs.

Both sides compute in float32, in different orders (sciscope ``addmm(b_enc, x - b_dec, W_enc)``,
SAELens ``(x - b_dec) @ W_enc + b_enc``; folded weights round once more), so codes agree to a few
units in the last place of the largest code.  An entry within that rounding of a JumpReLU /
BatchTopK threshold, or tied with the k-th largest in a TopK, can land on different sides; it then
differs by about the threshold.  Thresholds that sit exactly on a data value make that happen on
purpose, which is why the ones here do not.

Usage::

    .venv-bench/bin/python benchmarks/check_sae_interchange.py [--d-in 384 --d-sae 4096 --k 32 --batch 2048]

Writes ``benchmarks/results/sae_interchange.json``.  Needs the ``bench`` extra (``sae-lens``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import load_average, machine_info, write_result
from safetensors.torch import save_file
from torch import Tensor

from sciscope.core.errors import SciscopeError
from sciscope.core.sae import create_sae, load_sae, sae_config
from sciscope.core.sae.formats import export_saelens


def compare(case: str, direction: str, ours: Tensor, theirs: Tensor) -> dict[str, Any]:
    """Largest |difference| of two (B, d_sae) codes, with their scale, L0 and support mismatches."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    row = {
        "case": case,
        "direction": direction,
        "max_abs_diff": float((ours - theirs).abs().max()),
        "max_abs_code": float(theirs.abs().max()),
        "max_rel_diff": float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)),
        "l0_sciscope": float((ours != 0).sum(-1).double().mean()),
        "l0_reference": float((theirs != 0).sum(-1).double().mean()),
        "support_mismatches": int(((ours != 0) != (theirs != 0)).sum()),
    }
    print(f"{direction:32s} {case:44s} max|diff| {row['max_abs_diff']:.3g}  (max|code| {row['max_abs_code']:.3g}, "
          f"L0 {row['l0_sciscope']:.1f}/{row['l0_reference']:.1f}, support mismatches {row['support_mismatches']})")
    return row


def trained_like(d_in: int, d_sae: int, g: torch.Generator) -> dict[str, Tensor]:
    """W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec shaped like a trained SAE's."""
    rows = torch.randn(d_sae, d_in, generator=g)
    rows = rows / rows.norm(dim=1, keepdim=True)
    norms = 0.5 + 1.5 * torch.rand(d_sae, generator=g)
    return {
        "W_enc": (rows.t() + 0.05 * torch.randn(d_in, d_sae, generator=g)).contiguous(),
        "b_enc": -0.5 * torch.rand(d_sae, generator=g),
        "W_dec": (rows * norms[:, None]).contiguous(),
        "b_dec": 0.2 * torch.randn(d_in, generator=g),
    }


def thresholds(pre: Tensor, k: int) -> tuple[Tensor, float]:
    """Per-latent 99th percentiles of ``pre`` (B, d_sae), and a cut between the batch's (k * B)-th
    and (k * B + 1)-th largest ReLU(pre).

    Both lie between data values, as trained thresholds do: a threshold placed exactly on a
    pre-activation would flip that entry on float rounding alone (see the module docstring).
    """
    per_latent = pre.quantile(0.99, dim=0).clamp_min(0.01)
    top = pre.relu().flatten().topk(k * pre.shape[0] + 1).values
    return per_latent, float(top[-2:].mean())


def sciscope_to_saelens(args: argparse.Namespace, x: Tensor, tmp: Path) -> list[dict[str, Any]]:
    from sae_lens import SAE

    rows = []
    for arch in ("relu", "topk", "jumprelu", "batchtopk"):
        fields: dict[str, Any] = {"d_in": args.d_in, "d_sae": args.d_sae}
        if arch in ("topk", "batchtopk"):
            fields["k"] = args.k
        sae = create_sae(sae_config(arch, **fields), seed=0).eval()
        with torch.no_grad():
            for name, value in trained_like(args.d_in, args.d_sae, torch.Generator().manual_seed(1)).items():
                getattr(sae, name).copy_(value)
            per_latent, batch_cut = thresholds(sae.pre_acts(x), args.k)
            if arch == "jumprelu":
                sae.log_threshold.copy_(per_latent.log())
            if arch == "batchtopk":
                sae.threshold.fill_(batch_cut)
            theirs = SAE.load_from_disk(str(export_saelens(sae, tmp / f"ours-{arch}")))
            rows.append(compare(arch, "sciscope -> SAELens", sae.encode(x), theirs.encode(x)))
    return rows


def saelens_to_sciscope(args: argparse.Namespace, x: Tensor, tmp: Path) -> list[dict[str, Any]]:
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.registry import get_sae_class

    cases: list[tuple[str, dict[str, Any]]] = [
        ("standard", {}),
        ("standard", {"apply_b_dec_to_input": False}),
        ("topk", {"k": args.k}),
        ("topk", {"k": args.k, "rescale_acts_by_decoder_norm": True}),
        ("jumprelu", {}),
        ("batchtopk", {"k": args.k, "rescale_acts_by_decoder_norm": True}),
    ]
    rows = []
    for i, (arch, extra) in enumerate(cases):
        weights = trained_like(args.d_in, args.d_sae, torch.Generator().manual_seed(2))
        if arch == "batchtopk":  # trained with SAELens' trainer class, saved as its inference SAE
            theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, **extra))
        else:
            sae_cls, cfg_cls = get_sae_class(arch)
            theirs = sae_cls(cfg_cls(d_in=args.d_in, d_sae=args.d_sae, **extra))
        with torch.no_grad():
            for name, value in weights.items():
                getattr(theirs, name).copy_(value)
            pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
            per_latent, batch_cut = thresholds(pre * weights["W_dec"].norm(dim=1), args.k)
            if arch == "jumprelu":
                theirs.threshold.copy_(per_latent)
            path = tmp / f"theirs-{i}"
            if arch == "batchtopk":
                theirs.topk_threshold = torch.tensor(batch_cut, dtype=torch.double)
                theirs.save_inference_model(path)
                from sae_lens import SAE

                theirs = SAE.load_from_disk(str(path))
            else:
                theirs.save_model(path)
            ours = load_sae(path)
            name = f"{arch} {json.dumps(extra)}" if extra else arch
            rows.append(compare(f"{name} -> {ours.cfg.architecture}", "SAELens -> sciscope", ours.encode(x), theirs.encode(x)))
    return rows


def sparsify_to_sciscope(args: argparse.Namespace, x: Tensor, tmp: Path) -> list[dict[str, Any]]:
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k))
    w = trained_like(args.d_in, args.d_sae, torch.Generator().manual_seed(3))
    with torch.no_grad():
        coder.encoder.weight.copy_(w["W_enc"].t())
        coder.encoder.bias.copy_(w["b_enc"])
        coder.W_dec.copy_(w["W_dec"])
        coder.b_dec.copy_(w["b_dec"])
        coder.save_to_disk(tmp / "sparsify" / "layers.0")
        ours = load_sae(tmp / "sparsify" / "layers.0")
        top_acts, top_indices, _ = coder.encode(x)
        theirs = torch.zeros(x.shape[0], args.d_sae).scatter(1, top_indices, top_acts)
        return [compare("SparseCoder topk -> topk", "sparsify -> sciscope", ours.encode(x), theirs)]


def dictionary_learning_to_sciscope(args: argparse.Namespace, x: Tensor, tmp: Path) -> list[dict[str, Any]]:
    from dictionary_learning.dictionary import AutoEncoder, AutoEncoderNew, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    d_in, d_sae, k = args.d_in, args.d_sae, args.k
    groups = [d_sae // 4, d_sae // 4, d_sae - 2 * (d_sae // 4)]
    modules = {
        "AutoEncoder": AutoEncoder(d_in, d_sae),
        "AutoEncoderNew": AutoEncoderNew(d_in, d_sae),
        "AutoEncoderTopK": AutoEncoderTopK(d_in, d_sae, k),
        "BatchTopKSAE": BatchTopKSAE(d_in, d_sae, k),
        "MatryoshkaBatchTopKSAE": MatryoshkaBatchTopKSAE(d_in, d_sae, k, groups),
        "JumpReluAutoEncoder": JumpReluAutoEncoder(d_in, d_sae),
    }
    rows = []
    for i, (dict_class, module) in enumerate(modules.items()):
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            state = module.state_dict()
            for value in state.values():  # random non-trivial values of the library's shapes
                if value.is_floating_point() and value.ndim > 0:
                    value.copy_(torch.randn(value.shape, generator=g) * (d_in**-0.5 if value.ndim == 2 else 0.2))
            if "threshold" in state:
                if dict_class == "JumpReluAutoEncoder":
                    pre = x @ state["W_enc"] + state["b_enc"]
                elif "W_enc" in state:
                    pre = (x - state["b_dec"]) @ state["W_enc"] + state["b_enc"]
                else:
                    pre = torch.nn.functional.linear(x - state["b_dec"], state["encoder.weight"], state["encoder.bias"])
                per_latent, batch_cut = thresholds(pre, k)
                state["threshold"].copy_(per_latent if state["threshold"].ndim else torch.tensor(batch_cut))
            module.load_state_dict(state)
            path = tmp / "dictionary_learning" / dict_class
            path.mkdir(parents=True)
            cfg = {"trainer": {"dict_class": dict_class, "activation_dim": d_in, "dict_size": d_sae, "k": k}}
            (path / "config.json").write_text(json.dumps(cfg))
            # what a user's one-time conversion of ae.pt gives: the state dict as safetensors
            save_file({n: v.contiguous() for n, v in module.state_dict().items()}, path / "ae.safetensors")
            ours = load_sae(path)
            if dict_class == "AutoEncoder":
                module.normalize_decoder()  # what AutoEncoder.from_pretrained (load_dictionary) does
            rows.append(compare(f"{dict_class} -> {ours.cfg.architecture}", "dictionary_learning -> sciscope",
                                ours.encode(x), module.encode(x)))
    # the pickle itself is refused, unopened
    pickled = tmp / "dictionary_learning" / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    torch.save(modules["AutoEncoder"].state_dict(), pickled / "ae.pt")
    try:
        load_sae(pickled)
    except SciscopeError as exc:
        print(f"ae.pt only: refused: {exc}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    load_at_start = load_average()
    warnings.filterwarnings("ignore", category=UserWarning)
    g = torch.Generator().manual_seed(0)
    # activation-like: an offset plus spread, mean norm about sqrt(d_in)
    x = torch.randn(args.batch, args.d_in, generator=g) + 0.5 * torch.randn(args.d_in, generator=g)

    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for label, fn in (
            ("sae_lens", sciscope_to_saelens),
            ("sae_lens", saelens_to_sciscope),
            ("sparsify", sparsify_to_sciscope),
            ("dictionary_learning", dictionary_learning_to_sciscope),
        ):
            try:
                rows += fn(args, x, tmp)
            except ImportError as exc:
                skipped[label] = str(exc)
                print(f"{label}: skipped ({exc})")
    worst = max(r["max_abs_diff"] for r in rows)
    print(f"largest |code difference| over {len(rows)} cases: {worst:.3g}")
    write_result(
        "sae_interchange",
        {
            "machine": machine_info(["sae-lens", "eai-sparsify", "dictionary-learning", "safetensors"]),
            "sizes": {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "batch": args.batch},
            "cases": rows,
            "skipped": skipped,
            "max_abs_diff": worst,
        },
        load_at_start=load_at_start,
        out=args.out,
    )


if __name__ == "__main__":
    main()

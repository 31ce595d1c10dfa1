"""TopK transcoder (Dunefsky, Chlenski & Nanda 2024, "Transcoders Find Interpretable LLM Feature
Circuits"): a sparse code of an MLP's *input* trained to predict the MLP's *output*.

    pre   = (x_in - b_in) @ W_enc + b_enc          # (B, d_sae)   x_in: the MLP's input
    f     = ReLU(TopK_k(pre))                      # (B, d_sae)   at most k non-zeros per row
    y_hat = f @ W_dec + b_dec                      # (B, d_in)    predicts the MLP's output y
    loss  = ||y - y_hat||^2 + aux_coeff * AuxK     # AuxK: dead latents explain the residual y - y_hat

An SAE of the MLP's output explains what the MLP wrote; a transcoder replaces the MLP by a wide,
sparse, *linear-in-its-codes* map, so that a feature's effect downstream is its decoder row and its
cause upstream is its encoder column: the input-invariant circuits the paper reads.  Everything but
the pre-encoder bias is the TopK SAE's (:class:`~sciscope.core.sae.topk.TopKSAE`: sparse encode and
decode, AuxK, the dead-latent counters, safetensors I/O, bf16 shortcuts); the input lives in another
space than the output, so it gets its own bias ``b_in`` (the SAE's ``b_dec`` serves both sides)
and its own normalisation statistics, folded in by :meth:`TopKTranscoder.fold_normalization`.

The MLP's input and output both have the model's width, so ``d_out == d_in``; a plain batch (no
target) trains it as an autoencoder, a TopK SAE with a separate input bias.

Trained by :func:`~sciscope.core.sae.train_sae` from ``(input, target)`` batches; spliced into a
model in place of its MLP by :func:`splice_transcoder`; the core's analysis of a run's MLP is
:func:`transcoder_analysis` (``sae/transcoder/``, ``sae/transcoder_quality.csv``), read back in a
later process by :func:`load_run_transcoder`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from sciscope.core.errors import ConfigError
from sciscope.core.sae.base import register_sae
from sciscope.core.sae.topk import TopKConfig, TopKSAE

if TYPE_CHECKING:
    from sciscope.core.components import BlockComponents
    from sciscope.core.context import RunContext
    from sciscope.core.experiment import Analysis
    from sciscope.core.sites import Aliases, Site
    from sciscope.core.store import ActivationStore


@dataclass(kw_only=True)
class TopKTranscoderConfig(TopKConfig):
    """Config of :class:`TopKTranscoder`: the TopK SAE's fields (``d_in`` is the MLP's input and
    output width, ``d_sae`` the number of transcoder latents, ``k`` the latents kept per row)."""


@register_sae("topk_transcoder")
class TopKTranscoder(TopKSAE):
    """A TopK transcoder: ``encode(x_in)`` gives the codes, ``decode(codes)`` predicts the MLP output.

    ``forward(x_in)`` returns ``(y_hat, f)``; :meth:`~SparseAutoencoder.loss` takes the MLP output
    as ``target``.
    """

    config_class = TopKTranscoderConfig
    cfg: TopKTranscoderConfig
    transcodes = True

    def __init__(self, cfg: TopKTranscoderConfig, *, generator: torch.Generator | None = None) -> None:
        # The TopK SAE's initialisation (unit decoder rows, encoder tied to their transpose) is kept:
        # every latent starts reading the direction it writes, a start as good as any for an MLP
        # whose output space is not its input's, and one that keeps few latents dead.
        super().__init__(cfg, generator=generator)
        self.b_in = nn.Parameter(torch.zeros(cfg.d_in))  # (d_in,) pre-encoder bias, input space

    def _input_bias(self) -> Tensor:
        return self.b_in

    @torch.no_grad()
    def fold_normalization(self, mean: Tensor, scale: Tensor, *, target_mean: Tensor | None = None,
                           target_scale: Tensor | None = None) -> None:
        """Fold the input normalisation ``x_n = (x - mean) / scale`` and the target normalisation
        ``y_n = (y - target_mean) / target_scale`` into the weights (targets default to the input's).

        Afterwards the transcoder reads raw MLP inputs and writes raw MLP outputs, with the same codes::

            (x - m)/s - b_in == (x - b_in')/s            b_in'  = s * b_in + m,   W_enc' = W_enc / s[:, None]
            t * (f @ W_dec + b_dec) + m_t                W_dec' = W_dec * t[None, :],  b_dec' = t * b_dec + m_t

        Parameters
        ----------
        mean, scale
            Input statistics: (d_in,) or scalar; scale positive.
        target_mean, target_scale
            Target statistics, the same shapes.
        """
        dtype, dev, d = self.W_enc.dtype, self.W_enc.device, self.cfg.d_in

        def vec(v: Tensor | float) -> Tensor:
            return torch.as_tensor(v, dtype=dtype, device=dev).expand(d)  # (d_in,)

        mean, scale = vec(mean), vec(scale)
        t_mean = mean if target_mean is None else vec(target_mean)
        t_scale = scale if target_scale is None else vec(target_scale)
        if not bool((scale > 0).all() and (t_scale > 0).all()):
            raise ConfigError("normalisation scale must be positive to fold it into the weights")
        self.W_enc /= scale[:, None]
        self.b_in.copy_(scale * self.b_in + mean)
        self.W_dec *= t_scale[None, :]
        self.b_dec.copy_(t_scale * self.b_dec + t_mean)


# ------------------------------------------------------------------------------ in the model


def splice_transcoder(model: nn.Module, transcoder: Any, mlp_in: "str | Site", mlp_out: "str | Site", *,
                      positions: Any = None, aliases: "Aliases | None" = None) -> AbstractContextManager[None]:
    """Run ``model`` with ``transcoder`` in place of an MLP for every forward pass inside the block.

    The MLP's input (``mlp_in``) is read and its output (``mlp_out``) replaced by
    ``decode(encode(input))``; the MLP still runs (its output is overwritten), so anything that reads
    its hidden units sees the model's own. Hooks are gone when the block ends, also on an error.

    Parameters
    ----------
    model
        The model.
    transcoder
        A trained transcoder (``encode``/``decode``), e.g. :class:`TopKTranscoder`.
    mlp_in, mlp_out
        The MLP's input and output sites (:class:`~sciscope.core.components.BlockComponents`'
        ``mlp_in`` and ``mlp_out``), e.g. BERT's ``encoder.layer.1.intermediate:input`` and
        ``encoder.layer.1.output.dense``, or GPT-2's ``transformer.h.1.mlp:input`` and ``transformer.h.1.mlp``.
    positions
        Replace only these positions (see :func:`sciscope.core.steer.steer`); None: all.
    aliases
        Site aliases of the model.

    Examples
    --------
    >>> with splice_transcoder(model, tc, "transformer.h.1.mlp:input", "transformer.h.1.mlp"):  # doctest: +SKIP
    ...     logits = model(ids).logits
    """
    from sciscope.core.fidelity import sae_reconstruction, splice_from

    return splice_from(model, mlp_in, mlp_out, sae_reconstruction(transcoder), positions=positions, aliases=aliases)


def transcoder_block(model: nn.Module, adapter: Any) -> "BlockComponents":
    """The block whose MLP the run's transcoder replaces: the one whose residual output is the
    adapter's SAE site (aliases expanded), else the middle block of the layer stack.

    Raises
    ------
    SiteError
        The chosen block has no MLP input and output that :func:`~sciscope.core.components.block_components`
        finds (declare them in the adapter's ``component_templates``).
    AdapterError
        The model has no layer stack.
    """
    from sciscope.core.components import block_components
    from sciscope.core.errors import SiteError
    from sciscope.core.sites import Site, expand_alias

    blocks = block_components(model, adapter.component_templates)
    wanted = str(Site.parse(expand_alias(str(adapter.sae_site), adapter.aliases)))
    block = next((b for b in blocks if str(Site.parse(b.resid)) == wanted), blocks[len(blocks) // 2])
    if block.mlp_in is None or block.mlp_out is None:
        raise SiteError(f"transcoder: block {block.resid!r} has no MLP input and output sciscope finds; declare "
                        "'mlp' and 'mlp_in' in the adapter's component_templates")
    return block


def fit_ridge(inputs: np.ndarray, targets: np.ndarray, *, rel_alpha: float = 1e-3,
              chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """A dense linear map ``y ~ x @ W + b`` by ridge regression: the no-sparsity baseline of a transcoder.

    Accumulated in float64 over row chunks (``inputs`` may be a memory map). The penalty is
    ``rel_alpha`` times the mean eigenvalue of the inputs' covariance, so it is scale-free and,
    with many more rows than dimensions, barely bites.

    Parameters
    ----------
    inputs, targets
        ``(N, D_in)`` and ``(N, D_out)`` rows.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``W`` ``(D_in, D_out)`` and ``b`` ``(D_out,)``.
    """
    # not core/probe.py's ridge: that one holds (N, D) standardised rows in memory for an SVD and picks
    # alpha by leave-one-out; here N is every MLP position (a memory map) and a fixed small penalty is enough
    n, d = inputs.shape
    sx, sy = np.zeros(d), np.zeros(targets.shape[1])
    xx, xy = np.zeros((d, d)), np.zeros((d, targets.shape[1]))
    for start in range(0, n, chunk):
        x = np.asarray(inputs[start:start + chunk], dtype=np.float64)  # (c, D_in)
        y = np.asarray(targets[start:start + chunk], dtype=np.float64)  # (c, D_out)
        sx += x.sum(0)
        sy += y.sum(0)
        xx += x.T @ x
        xy += x.T @ y
    mx, my = sx / max(n, 1), sy / max(n, 1)
    cov = xx / max(n, 1) - np.outer(mx, mx)  # (D_in, D_in)
    cross = xy / max(n, 1) - np.outer(mx, my)  # (D_in, D_out)
    alpha = rel_alpha * max(float(np.trace(cov)) / d, 1e-12)
    w = np.linalg.solve(cov + alpha * np.eye(d), cross)
    return w, my - mx @ w


def linear_map(w: np.ndarray, b: np.ndarray) -> Callable[[Tensor], Tensor]:
    """``h -> h @ w + b`` on ``(N, D_in)`` tensors (float32)."""
    wt, bt = torch.as_tensor(w, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return lambda h: h @ wt.to(h.device) + bt.to(h.device)


# ------------------------------------------------------------------------------ the analysis

#: the columns of ``transcoder_quality.csv``: the transcoder, its controls and baselines
QUALITY_COLUMNS = ("transcoder", "untrained_transcoder", "pca_at_l0", "ridge")
#: where the run's transcoder lives, under the sae stage's folder
FOLDER = "transcoder"
SITES_FILE = "sites.json"


def capture_mlp_rows(ctx: "RunContext", block: "BlockComponents", out: Path) -> "ActivationStore":
    """The MLP's input and output at every valid position of every example, into a store at ``out``.

    One row per (example, position) that the batches' ``position_mask`` (else ``attention_mask``)
    keeps: padding never becomes a row. obs carries ``example_row`` (as the SAE's position rows do),
    so held-out examples and row caps keep whole examples.
    """
    from sciscope.core.capture import collect
    from sciscope.core.sae.rows import EXAMPLE_ROW

    ad, ex, model = ctx.adapter, ctx.examples(), ctx.model()
    bs = int(ctx.config.get("batch_size", 64))
    obs = ex.obs.reset_index(drop=True).assign(**{EXAMPLE_ROW: np.arange(len(ex))})
    return collect(model, ad.batches(ex, model, batch_size=bs), [block.mlp_in, block.mlp_out], out=out, obs=obs,
                   pooling="none", aliases=ad.aliases, seed=ctx.seed, progress=ctx.progress, total=-(-len(ex) // bs),
                   extra_manifest={"domain": ad.name, "rows": f"MLP input and output of block {block.layer}"})


def select_mlp_rows(ctx: "RunContext", store: "ActivationStore", mlp_in: str, mlp_out: str
                    ) -> tuple["ActivationStore", dict[str, Any]]:
    """The rows a transcoder learns from: the adapter's positions (``fidelity_positions``), without
    rows whose MLP input *or* output has an outlier norm (config ``outlier_norm``; massive
    activations are often an MLP's output), as the SAE's rows are chosen."""
    from sciscope.core.sae.rows import select_sae_rows

    factor = float(ctx.config.get("outlier_norm", 10.0))
    rule = _row_rule(ctx.adapter.fidelity_positions)
    keep_in, report = select_sae_rows(store, mlp_in, positions=rule, outlier_factor=factor)
    keep_out, report_out = select_sae_rows(store, mlp_out, positions=rule, outlier_factor=factor)
    kept = np.intersect1d(keep_in, keep_out)
    report = {"positions": report["positions"], "kept": int(len(kept)),
              "excluded_by_position_rule": report["excluded_by_position_rule"],
              "excluded_outlier_norm_input": report["excluded_outlier_norm"],
              "excluded_outlier_norm_output": report_out["excluded_outlier_norm"], "outlier_factor": factor}
    return store.select(kept), report


def _row_rule(positions: Any) -> Any:
    """The adapter's position rule for per-position rows, or None (every valid position) where it
    counts from the end (robotics' action positions, ``[-2, -1]``): a stored row knows its position
    from the start only, and the MLP is the same map at every position."""
    if isinstance(positions, slice):
        ends = [positions.start or 0, positions.stop or 0]
        return None if min(ends) < 0 else positions
    if positions is not None and min(int(p) for p in positions) < 0:
        return None
    return positions


def transcoder_analysis() -> "Analysis":
    """The core's transcoder analysis, run after the sae stage for every adapter with a task loss
    and a layer stack whose blocks have an MLP.

    Trains a TopK transcoder (the run's ``sae_*`` recipe) from the MLP input to the MLP output of
    the block whose residual output is the SAE's site (else the middle block), saves it under
    ``sae/transcoder/``, and writes ``sae/transcoder_quality.csv`` (held-out explained variance of
    the MLP output, L0, dead fraction, loss recovered with it spliced in place of the MLP) beside an
    untrained transcoder (the control), PCA of the MLP output with as many components as its L0 and
    a dense ridge map input -> output (the baselines), and ``sae/transcoder_fidelity.csv``.
    ``ctx.live["transcoder"]`` holds ``(transcoder, layer, mlp_in, mlp_out)`` for the analyses after
    it; a later process reads the same with :func:`load_run_transcoder`.
    """
    from sciscope.core.experiment import Analysis

    return Analysis("transcoder", "sae", compute_transcoder, transcoder_rows)


def compute_transcoder(ctx: "RunContext") -> dict[str, Any] | None:
    """The transcoder analysis' work (see :func:`transcoder_analysis`); None where the run sets
    ``sae_transcoder=false``, the adapter has no task loss or the model no MLP blocks."""
    import shutil

    from sciscope.core.errors import AdapterError, SiteError

    adapter = ctx.adapter
    if not ctx.config.get("sae_transcoder", True):
        return None
    task = adapter.task_loss(ctx)
    if task is None:
        return None
    model = ctx.model()
    try:
        block = transcoder_block(model, adapter)
    except (AdapterError, SiteError):
        return None  # no layer stack, or blocks without an MLP this code knows: nothing to replace
    rows_dir = ctx.output("transcoder_rows")  # the captured rows, removed once the transcoder is scored
    try:
        store = capture_mlp_rows(ctx, block, rows_dir)
        mlp_in, mlp_out = store.sites  # as collect names them (the order asked)
        if store.dim(mlp_in) != store.dim(mlp_out):
            raise SiteError(f"transcoder: the MLP input {mlp_in!r} has width {store.dim(mlp_in)} but its output "
                            f"{mlp_out!r} has {store.dim(mlp_out)}; a transcoder here maps a width to itself")
        rows, report = select_mlp_rows(ctx, store, mlp_in, mlp_out)
        train, test = ctx.split_rows(rows)
        result = _train_and_score(ctx, block, task, train, test, mlp_in, mlp_out)
    finally:
        shutil.rmtree(rows_dir, ignore_errors=True)
    result["rows"] = report
    return result


def _train_and_score(ctx: "RunContext", block: "BlockComponents", task: Any, train: "ActivationStore",
                     test: "ActivationStore", mlp_in: str, mlp_out: str) -> dict[str, Any]:
    from sciscope.core.fidelity import FromSite, fidelity, pca_reconstruction, sae_reconstruction
    from sciscope.core.sae.base import create_sae
    from sciscope.core.sae.metrics import (
        evaluate_sae,
        pca_explained_variance,
        predictor_explained_variance,
        principal_components,
    )

    adapter, model = ctx.adapter, ctx.model()
    trained = ctx.train_on_rows(train, mlp_in, target_site=mlp_out, architecture="topk_transcoder", single_process=True)
    tc = trained.sae
    # the control: the same config from another seed, untrained, with the training rows' statistics
    # folded in (it predicts the output's mean plus a random sparse read of the input's scale)
    untrained = create_sae(trained.cfg, seed=ctx.seed + 1)
    norm = trained.normalization
    if norm["method"] != "none":
        untrained.fold_normalization(torch.tensor(norm["mean"]), torch.tensor(norm["scale"]),
                                     target_mean=torch.tensor(norm["target_mean"]),
                                     target_scale=torch.tensor(norm["target_scale"]))
    untrained.eval()

    def pairs(rows: "ActivationStore") -> Callable[[], Any]:
        return lambda: zip(rows.iter_batches(mlp_in, 4096), rows.iter_batches(mlp_out, 4096), strict=True)

    held = {name: evaluate_sae(m, pairs(test)) for name, m in (("transcoder", tc), ("untrained_transcoder", untrained))}
    in_sample = evaluate_sae(tc, pairs(train))
    k = max(1, int(round(held["transcoder"]["l0"])))
    out_train = train.array(mlp_out)  # (N, D) the MLP's outputs on the training rows
    comps = principal_components(out_train)
    w, b = fit_ridge(train.array(mlp_in), out_train)
    ridge = linear_map(w, b)
    ev = {"transcoder": held["transcoder"]["explained_variance"],
          "untrained_transcoder": held["untrained_transcoder"]["explained_variance"],
          "pca_at_l0": pca_explained_variance(out_train, test.array(mlp_out), k, components=comps),
          "ridge": predictor_explained_variance(ridge, pairs(test))}  # scored as evaluate_sae scores the transcoder
    fid = fidelity(model, mlp_out, task, {
        "transcoder": FromSite(mlp_in, sae_reconstruction(tc)),
        "untrained_transcoder": FromSite(mlp_in, sae_reconstruction(untrained)),
        "pca_at_l0": pca_reconstruction(out_train, k, components=comps),
        "ridge": FromSite(mlp_in, ridge),
    }, positions=adapter.fidelity_positions, aliases=adapter.aliases)
    fid.insert(1, "task", task.name)
    t = fid.set_index("condition")
    d = train.dim(mlp_out)
    table_rows: list[dict[str, Any]] = []

    def add(metric: str, values: dict[str, float], note: str = "") -> None:
        table_rows.append({"metric": metric, **{c: values.get(c, np.nan) for c in QUALITY_COLUMNS}, "note": note})

    add("explained variance of the MLP output (held-out)", ev,
        f"{test.n_obs} held-out rows; PCA of the MLP output itself with {k} components (the transcoder's L0); "
        "ridge: a dense linear map of the MLP input")
    add("explained variance of the MLP output (training rows)", {"transcoder": in_sample["explained_variance"]},
        f"{train.n_obs} training rows")
    add("L0 (active units per row)", {"transcoder": held["transcoder"]["l0"], "untrained_transcoder": held["untrained_transcoder"]["l0"],
                                      "pca_at_l0": k, "ridge": d}, "ridge is dense: every input unit")
    add("dead fraction (held-out)", {c: held[c]["dead_fraction"] for c in held}, "latents that never fire on a held-out row")
    add("units", {"transcoder": tc.cfg.d_sae, "untrained_transcoder": untrained.cfg.d_sae, "pca_at_l0": k, "ridge": d})
    conditions = {c: c for c in QUALITY_COLUMNS}
    add("task loss", {c: float(t.loss[v]) for c, v in conditions.items()},
        f"{task.name}: clean {t.loss['clean']:.4g}, MLP mean-ablated {t.loss['mean_ablation']:.4g}, "
        f"MLP zero-ablated {t.loss['zero_ablation']:.4g}")
    add("loss recovered", {c: float(t.loss_recovered[v]) for c, v in conditions.items()},
        "in place of the MLP (0 = MLP zero-ablated, 1 = clean); transcoder_fidelity.csv")
    add("loss recovered vs mean ablation", {c: float(t.loss_recovered_vs_mean[v]) for c, v in conditions.items()},
        "0 = the MLP output's mean in its place")
    if np.isfinite(t.kl["transcoder"]):
        add("KL from clean outputs", {c: float(t.kl[v]) for c, v in conditions.items()})
    quality = pd.DataFrame(table_rows)

    folder = trained.save(ctx.output(FOLDER))
    sites = {"layer": block.layer, "mlp_in": mlp_in, "mlp_out": mlp_out, "resid": block.resid,
             "architecture": tc.cfg.architecture}
    ctx.write_json(f"{FOLDER}/{SITES_FILE}", sites)
    ctx.write_table("transcoder_fidelity.csv", fid)
    source = ctx.write_table("transcoder_quality.csv", quality)
    ctx.live["transcoder"] = (tc, block.layer, mlp_in, mlp_out)
    return {"quality": quality, "fidelity": fid, "task": task.name, "k": k, "layer": block.layer, "mlp_in": mlp_in,
            "mlp_out": mlp_out, "steps": trained.steps, "folder": str(folder), "source": source,
            "fidelity_source": ctx.source("transcoder_fidelity.csv"), "n_train": train.n_obs, "n_test": test.n_obs}


def transcoder_rows(result: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Headline rows (the format of :func:`sciscope.core.fidelity._fidelity_rows`): loss recovered
    with the transcoder in place of the MLP, and the held-out explained variance of the MLP output."""
    from sciscope.core.verdict import FRACTION_MARGIN

    if result is None:
        return []
    q = result["quality"].set_index("metric")
    t = result["fidelity"].set_index("condition")
    where = f"the MLP of block {result['layer']} ({result['mlp_in']} -> {result['mlp_out']})"
    lr, ev = q.loc["loss recovered"], q.loc["explained variance of the MLP output (held-out)"]
    note = (f"{result['task']} with the transcoder in place of {where}: clean {t.loss['clean']:.4g}, transcoder "
            f"{t.loss['transcoder']:.4g}, untrained transcoder {t.loss['untrained_transcoder']:.4g}, PCA-{result['k']} of "
            f"the MLP output {t.loss['pca_at_l0']:.4g}, dense ridge map {t.loss['ridge']:.4g}, MLP mean-ablated "
            f"{t.loss['mean_ablation']:.4g}, zero-ablated {t.loss['zero_ablation']:.4g}; loss recovered: untrained "
            f"{lr['untrained_transcoder']:.3f}, ridge {lr['ridge']:.3f}")
    if np.isfinite(t.loss_recovered_vs_mean["transcoder"]):
        note += f"; against mean ablation: transcoder {t.loss_recovered_vs_mean['transcoder']:.3f}"
    gap = float(t.loss["zero_ablation"] - t.loss["clean"])
    value, control, baseline = float(lr["transcoder"]), float(t.loss_recovered["mean_ablation"]), float(lr["pca_at_l0"])
    if not gap > 0:
        # the ratio's denominator: an MLP whose removal does not cost the task leaves nothing to recover,
        # and any number would be noise over a gap of zero (the table keeps them)
        value = control = baseline = float("nan")
        note = (f"NOT MEASURED: zero-ablating the MLP does not raise the task loss (gap {gap:+.3g}), so the task "
                f"does not read this MLP and loss recovered has no denominator; " + note)
    else:
        note += f"; the zero-ablation gap is {gap:.3g} ({gap / max(abs(float(t.loss['clean'])), 1e-12):.1%} of the clean loss)"
    return [
        {"name": "loss recovered (transcoder in place of the MLP)", "value": value,
         "control": control, "control_label": "MLP mean-ablated (its mean output spliced in)",
         "baseline": baseline, "baseline_label": "PCA of the MLP output with as many components as the transcoder's L0",
         "tolerance": FRACTION_MARGIN, "note": note, "source": result["source"]},
        {"name": "transcoder explained variance of the MLP output (held-out)", "value": float(ev["transcoder"]),
         "control": float(ev["untrained_transcoder"]), "control_label": "the same transcoder untrained (random init)",
         "baseline": float(ev["ridge"]), "baseline_label": "a dense linear map (ridge) of the MLP input",
         "tolerance": FRACTION_MARGIN,
         "note": (f"{where}; {result['n_train']} training / {result['n_test']} held-out rows, {result['steps']} steps; "
                  f"L0 {q.loc['L0 (active units per row)', 'transcoder']:.1f}, dead fraction "
                  f"{q.loc['dead fraction (held-out)', 'transcoder']:.3f}; PCA-{result['k']} of the output itself "
                  f"{ev['pca_at_l0']:.3f}"),
         "source": result["source"]},
    ]


def load_run_transcoder(ctx: "RunContext") -> tuple[Any, int, str, str] | None:
    """``(transcoder, layer, mlp_in, mlp_out)`` of the run: from this process (``ctx.live``) or from
    ``sae/transcoder/`` written by the transcoder analysis; None when the run has none."""
    from sciscope.core.errors import SciscopeError
    from sciscope.core.sae.base import load_sae

    if "transcoder" in ctx.live:
        return ctx.live["transcoder"]
    try:
        folder = ctx._artifact("sae", FOLDER)
    except SciscopeError:
        return None
    layer, mlp_in, mlp_out = _read_sites(folder / SITES_FILE)
    found = (load_sae(folder), layer, mlp_in, mlp_out)
    ctx.live["transcoder"] = found
    return found


def _read_sites(path: Path) -> tuple[int, str, str]:
    """``(layer, mlp_in, mlp_out)`` from the transcoder analysis' ``sites.json``.

    Raises
    ------
    IntegrityError
        The file is missing, is not a JSON object, or lacks a key (or holds one of the wrong type):
        it is not what the analysis wrote, and a transcoder spliced at a guessed site would be wrong.
    """
    import json

    from sciscope.core.errors import IntegrityError

    rerun = "rerun the sae stage to write it again"
    try:
        sites = json.loads(path.read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing: the transcoder beside it has no recorded sites; {rerun}") from None
    except (OSError, ValueError) as err:
        raise IntegrityError(f"{path} cannot be read as JSON ({err}); {rerun}") from None
    if not isinstance(sites, dict):
        raise IntegrityError(f"{path} holds a {type(sites).__name__}, not a JSON object; {rerun}")
    for key, kind, what in (("layer", int, "an integer"), ("mlp_in", str, "a site"), ("mlp_out", str, "a site")):
        if key not in sites:
            raise IntegrityError(f"{path} has no key {key!r} (it has {sorted(sites)}); {rerun}")
        if not isinstance(sites[key], kind) or isinstance(sites[key], bool):
            raise IntegrityError(f"{path}: key {key!r} is {sites[key]!r}, not {what}; {rerun}")
    return sites["layer"], sites["mlp_in"], sites["mlp_out"]


__all__ = ["TopKTranscoder", "TopKTranscoderConfig", "compute_transcoder", "fit_ridge", "load_run_transcoder",
           "splice_transcoder", "transcoder_analysis", "transcoder_block", "transcoder_rows"]

"""Interchange with the field's SAE tools: SAELens, dictionary_learning and EleutherAI sparsify.

:func:`~sciscope.core.sae.load_sae` hands every directory that is not sciscope's own to
:func:`load_foreign`, which tells the format from the files (:func:`detect_format`) and builds the
equivalent sciscope SAE: the same codes for the same input, within float32 rounding.
:func:`export_saelens` writes the other way, a directory that SAELens'
``SAE.load_from_disk(path)`` reads (and that :func:`load_sae` reads back as the same SAE).

Every SAE here computes, in sciscope's form::

    pre = (x - b_dec) @ W_enc + b_enc          W_enc (d_in, d_sae), W_dec (d_sae, d_in)
    f   = sigma(pre);   x_hat = f @ W_dec + b_dec

so what a reader does is rewrite each library's weights into that form.  The rewrites:

* **Transposes.**  ``nn.Linear`` weights are (out, in): sparsify's and dictionary_learning's
  ``encoder.weight`` is (d_sae, d_in), their ``decoder.weight`` (d_in, d_sae).
* **No input centring.**  SAELens ``apply_b_dec_to_input=False``, dictionary_learning's
  ``JumpReluAutoEncoder`` and ``AutoEncoderNew`` compute ``x @ W_enc + b_enc``; the same map is
  ``(x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)``.
* **Decoder norms.**  SAELens ``rescale_acts_by_decoder_norm`` (TopK, BatchTopK) multiplies the
  pre-activations by ``||W_dec[i]||`` and divides them back before decoding; folding the norms into
  ``W_enc``, ``b_enc`` and ``W_dec`` gives the same codes.  dictionary_learning's loader
  (``load_dictionary``) normalises a plain ``AutoEncoder``'s decoder the same way, so codes match
  what its users see.
* **Input scaling.**  An SAE trained on ``s * x`` (SAELens ``expected_average_only_in``) reads raw
  ``x`` once ``s`` is folded in (``W_enc * s``, ``W_dec / s``, ``b_dec / s``); the factor comes from
  the argument ``norm_scaling_factor`` or the folder's ``activation_scaler.json``.
* **Thresholds.**  SAELens and dictionary_learning JumpReLU compute ``ReLU(pre) * (pre > t)``,
  sciscope ``pre * (pre > t)`` with ``t = exp(log_threshold) > 0``: the same for ``t >= 0``, and a
  threshold ``t <= 0`` acts as ``t = 0`` (plain ReLU), stored as the smallest positive float32.  A
  uniform threshold (SAELens writes a trained BatchTopK SAE as JumpReLU with one threshold in every
  latent) becomes sciscope's BatchTopK when the metadata says it was trained as one.

What cannot be rewritten is refused with a :class:`ConfigError` naming the file and the field:
per-sample normalisation (``layer_norm``, ``constant_norm_rescale``), gated SAEs, transcoders and
skip connections, sparsify's ``groupmax``.  Only JSON and safetensors are read: dictionary_learning's
``ae.pt`` is a pickle, which can run code when loaded, so it is refused with the one-line
conversion to safetensors instead.

Loaded SAEs compute in float32 whatever dtype the files hold (SAELens may compute in bfloat16).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from sciscope.core.errors import ConfigError, IntegrityError, SciscopeError, ShapeError
from sciscope.core.io import atomic_path
from sciscope.core.sae.base import (
    CHECKSUM_KEY,
    CONFIG_CHECKSUM_KEY,
    CONFIG_FILE,
    SAE_REGISTRY,
    WEIGHTS_FILE,
    SparseAutoencoder,
    _check_finite,
    config_sha256,
    create_sae,
    sae_config,
    tensors_sha256,
    verify_checksums,
)

Format = Literal["sciscope", "saelens", "sparsify", "dictionary_learning"]

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
# SAELens training checkpoints keep the input-scaling factor beside the weights.
SAELENS_SCALER_FILE = "activation_scaler.json"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"  # the same name as sciscope's: told apart by cfg.json
DICTIONARY_LEARNING_CONFIG = "config.json"
DICTIONARY_LEARNING_WEIGHTS = "ae.safetensors"  # the user's conversion of ae.pt (see _DL_CONVERT)
DICTIONARY_LEARNING_PICKLE = "ae.pt"
# SAELens >= 6 reads cfg.json as its 6.x layout only when the version it records is >= 6; older
# files go through a converter that drops nested metadata.  We write that layout (no sae_lens import).
SAELENS_LAYOUT_VERSION = "6.0.0"
# SAELens architectures read here -> the sciscope architecture with the same encodings.
SAELENS_ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}
# sciscope architectures export_saelens writes -> SAELens' inference architecture.  A registered
# subclass that encodes like one of them (Matryoshka is BatchTopK at inference) exports as it.
SAELENS_EXPORT = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
# The methods that make up encode(); a subclass overriding none of them encodes like its base.
# ``_input_bias``: a transcoder subtracts its own input bias, not b_dec, so it encodes unlike a TopK SAE
_ENCODE_METHODS = ("encode", "_encode", "pre_acts", "_pre_act_operands", "_input_bias", "_check_input")
# SAELens' names of the training architectures of sciscope's BatchTopK-like ones.
_SAELENS_TRAINING_NAMES = {"matryoshka": "matryoshka_batchtopk"}
# SAELens training architectures whose inference SAE is a JumpReLU with one threshold for all latents.
_BATCHTOPK_LIKE = ("batchtopk", "matryoshka_batchtopk")
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# The smallest positive float32: a JumpReLU threshold <= 0 lets every positive pre-activation through,
# and log(0) is not finite.  Differs from 0 only for pre-activations in (0, 1.2e-38].
_TINY = torch.finfo(torch.float32).tiny
_DL_CONVERT = (
    "convert it once, in a trusted session, with: python -c \"import torch; "
    "from safetensors.torch import save_file; sd = torch.load('ae.pt', weights_only=True); "
    "sd = sd.get('ae', sd); save_file({k: v.contiguous() for k, v in sd.items()}, 'ae.safetensors')\""
)


# ------------------------------------------------------------------------------------ detection


def detect_format(path: str | os.PathLike[str]) -> Format:
    """Which library wrote the SAE directory ``path``.

    ``"saelens"``: ``sae_weights.safetensors``, or a ``cfg.json`` with SAELens keys (``dtype``,
    ``apply_b_dec_to_input``); ``"sparsify"``: ``cfg.json`` without ``architecture`` but with
    ``k`` and ``num_latents`` / ``expansion_factor``; ``"dictionary_learning"``: ``config.json`` with
    a ``trainer`` section, or an ``ae.pt``; otherwise ``"sciscope"`` (including folders that are
    nothing at all, so that :func:`load_sae` reports them as before).

    Raises
    ------
    SciscopeError
        ``path`` holds no SAE but sub-folders that do (a release with several hook points, as
        sparsify and SAELens publish them): the message lists them.
    """
    path = Path(path)
    if not path.is_dir():
        return "sciscope"
    if (path / SAELENS_WEIGHTS_FILE).is_file():
        return "saelens"  # sciscope never writes this file
    cfg = _peek_json(path / CONFIG_FILE)
    if cfg is not None:
        if "architecture" not in cfg and "k" in cfg and ("num_latents" in cfg or "expansion_factor" in cfg):
            return "sparsify"
        if "dtype" in cfg or "apply_b_dec_to_input" in cfg:
            return "saelens"  # its weights file is missing: load_saelens says so
        return "sciscope"
    if (path / CONFIG_FILE).exists():
        return "sciscope"  # unreadable cfg.json: the sciscope loader names the JSON error
    dl_cfg = _peek_json(path / DICTIONARY_LEARNING_CONFIG)
    if (dl_cfg is not None and isinstance(dl_cfg.get("trainer"), dict)) or (path / DICTIONARY_LEARNING_PICKLE).is_file():
        return "dictionary_learning"
    if not (path / WEIGHTS_FILE).exists():
        subdirs = sorted(
            p.name
            for p in path.iterdir()
            if p.is_dir() and ((p / CONFIG_FILE).is_file() or (p / DICTIONARY_LEARNING_CONFIG).is_file())
        )
        if subdirs:
            shown = ", ".join(subdirs[:8]) + (", ..." if len(subdirs) > 8 else "")
            raise SciscopeError(
                f"{path} holds no SAE itself but {len(subdirs)} folders that do ({shown}): "
                f"load one of them, e.g. load_sae({str(path / subdirs[0])!r})"
            )
    return "sciscope"


def load_foreign(
    path: str | os.PathLike[str], fmt: Format | None = None, *, device: str | torch.device = "cpu"
) -> SparseAutoencoder:
    """Load an SAE directory written by SAELens, sparsify or dictionary_learning (eval mode).

    Parameters
    ----------
    path
        The directory.
    fmt
        Its format; ``None`` detects it (:func:`detect_format`).
    device
        Where the returned module lives.
    """
    fmt = detect_format(path) if fmt is None else fmt
    if fmt == "saelens":
        return load_saelens(path, device=device)
    if fmt == "sparsify":
        return load_sparsify(path, device=device)
    if fmt == "dictionary_learning":
        return load_dictionary_learning(path, device=device)
    raise ConfigError(f"{path}: format {fmt!r} is not a foreign SAE format (saelens, sparsify, dictionary_learning)")


# --------------------------------------------------------------------------------------- SAELens


def load_saelens(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    norm_scaling_factor: float | None = None,
) -> SparseAutoencoder:
    """Load a SAELens SAE directory (``cfg.json`` + ``sae_weights.safetensors``) as a sciscope SAE.

    Reads SAELens 6 configs and the older (< 6) layout (``activation_fn_str``,
    ``activation_fn_kwargs``, boolean ``normalize_activations``, a ``scaling_factor`` tensor),
    inference SAEs and training checkpoints.  ``standard`` -> ``relu``, ``topk`` -> ``topk``,
    ``jumprelu`` -> ``jumprelu`` (or ``batchtopk`` when the metadata says it was trained as
    BatchTopK and the threshold is one number), ``batchtopk`` checkpoints -> ``batchtopk``.
    ``hook_z`` SAEs load too; they read the flattened ``(..., n_heads * d_head)`` activations.

    Parameters
    ----------
    path
        The directory.
    device
        Where the returned module lives.
    norm_scaling_factor
        For ``normalize_activations="expected_average_only_in"``: the factor the activations were
        multiplied by in training (SAELens lists it as ``norm_scaling_factor`` for its pretrained
        releases); folded into the weights, so the SAE reads raw activations.  Without it, the
        folder's ``activation_scaler.json`` is used; without either, loading is refused.

    Raises
    ------
    ConfigError
        An architecture, activation or normalisation sciscope cannot express (the message names
        the file and the field).
    SciscopeError
        A missing or unreadable file, or tensors that are not the architecture's.
    IntegrityError
        A directory written by :func:`export_saelens` whose files changed since.
    """
    path = Path(path)
    cfg_path, weights_path = path / CONFIG_FILE, path / SAELENS_WEIGHTS_FILE
    raw = _read_json(cfg_path)
    tensors, meta = _read_safetensors(weights_path)
    verify_checksums(tensors, meta, raw, weights_path, cfg_path)
    where = str(cfg_path)

    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    version = raw.get("sae_lens_version") or metadata.get("sae_lens_version")
    architecture = raw.get("architecture", "standard")
    k = raw.get("k", 100)  # SAELens' TopKSAEConfig default, used when the key is absent
    normalize = raw.get("normalize_activations", "none")
    if not _is_saelens_6(version):
        # The layout before SAELens 6 (what its handle_pre_6_0_config converts).
        activation = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
        kwargs = raw.get("activation_fn_kwargs") or {}
        if activation == "topk" and kwargs.get("k") is not None:
            architecture, k = "topk", kwargs["k"]
        elif architecture == "standard" and activation != "relu":
            field = "activation_fn" if "activation_fn" in raw else "activation_fn_str"
            raise ConfigError(
                f"{where}: {field}={activation!r} has no sciscope equivalent "
                "(a standard SAE is read with ReLU or TopK activations only)"
            )
        if isinstance(normalize, bool):
            normalize = "expected_average_only_in" if normalize else "none"
    if architecture not in SAELENS_ARCHITECTURES:
        raise ConfigError(
            f"{where}: architecture={architecture!r} has no sciscope equivalent "
            f"(sciscope reads SAELens {sorted(SAELENS_ARCHITECTURES)})"
        )
    d_in, d_sae = _int_field(raw, "d_in", where), _int_field(raw, "d_sae", where)

    expected = {"W_enc", "b_enc", "W_dec", "b_dec"}
    optional = {"scaling_factor"}
    if architecture == "jumprelu":
        expected.add("log_threshold" if "log_threshold" in tensors else "threshold")
    if architecture == "batchtopk":
        optional.add("topk_threshold")
    _check_tensor_names(tensors, expected, optional, weights_path, f"a SAELens {architecture!r} SAE")
    W_enc = _as64(tensors["W_enc"], (d_in, d_sae), "W_enc", weights_path)
    W_dec = _as64(tensors["W_dec"], (d_sae, d_in), "W_dec", weights_path)
    b_enc = _as64(tensors["b_enc"], (d_sae,), "b_enc", weights_path)
    b_dec = _as64(tensors["b_dec"], (d_in,), "b_dec", weights_path)
    _check_finite(tensors, str(weights_path))

    # 1. SAELens < 6 could fine-tune a per-latent scale that multiplies the codes before decoding
    if "scaling_factor" in tensors:
        scale = _as64(tensors["scaling_factor"], (d_sae,), "scaling_factor", weights_path)
        if not bool(torch.all(scale == 1)):
            if not raw.get("finetuning_scaling_factor", False):
                raise ConfigError(
                    f"{where}: finetuning_scaling_factor is false, but {weights_path.name} holds a "
                    "'scaling_factor' that is not all ones"
                )
            W_dec = W_dec * scale[:, None]
    # 2. SAEs that do not subtract b_dec from their input
    apply_b_dec = raw.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise ConfigError(f"{where}: apply_b_dec_to_input must be true or false, got {apply_b_dec!r}")
    if not apply_b_dec:
        b_enc = b_enc + b_dec @ W_enc
    # 3. TopK / BatchTopK that rank pre-activations times decoder norms
    if architecture in ("topk", "batchtopk") and raw.get("rescale_acts_by_decoder_norm", False):
        W_enc, b_enc, W_dec = _fold_decoder_norms(W_enc, b_enc, W_dec)
    # 4. an input scaling the SAE was trained with
    if normalize not in (None, "none"):
        if normalize != "expected_average_only_in":
            raise ConfigError(
                f"{where}: normalize_activations={normalize!r} cannot be folded into the weights: "
                + (
                    "it is a per-sample normalisation, not an affine map"
                    if normalize in ("layer_norm", "constant_norm_rescale")
                    else "load the final SAE SAELens writes after training (it folds the whitening in)"
                )
            )
        s = norm_scaling_factor if norm_scaling_factor is not None else _saelens_scaler(path)
        if s is None:
            raise ConfigError(
                f"{where}: normalize_activations='expected_average_only_in': the SAE reads activations "
                f"multiplied by a data-set factor that is not in {path} (no {SAELENS_SCALER_FILE}); pass "
                "it as load_saelens(path, norm_scaling_factor=...) (SAELens lists it as "
                "norm_scaling_factor for its pretrained releases)"
            )
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s <= 0:
            raise ConfigError(f"{where}: the activation scaling factor must be a positive number, got {s!r}")
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s

    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    fields: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "normalize": "none"}
    target = SAELENS_ARCHITECTURES[architecture]
    threshold: Tensor | None = None
    if architecture == "topk":
        fields["k"] = _int_value(k, "k", where)
    elif architecture == "batchtopk":
        value = tensors.get("topk_threshold", torch.tensor(-1.0)).double().reshape(-1)
        threshold = value[0] if value.numel() == 1 else None
        if threshold is None:
            raise ShapeError(f"{weights_path}: 'topk_threshold' must hold one number, got shape {tuple(value.shape)}")
        k_int = _integral(k)
        if k_int is None:  # a fractional mean k: same codes as a JumpReLU with that threshold
            target, threshold = "jumprelu", threshold.expand(d_sae)
        else:
            fields["k"] = k_int
    elif architecture == "jumprelu":
        if "log_threshold" in tensors:
            threshold = _as64(tensors["log_threshold"], (d_sae,), "log_threshold", weights_path).exp()
        else:
            threshold = _as64(tensors["threshold"], (d_sae,), "threshold", weights_path)
        trained_as = metadata.get("training_architecture")
        batchtopk_like = trained_as in _BATCHTOPK_LIKE or _carried_kind(metadata) == "batchtopk"
        k_int = _integral((metadata.get("training_architecture_details") or {}).get("k"))
        if batchtopk_like and k_int is not None and bool(torch.all(threshold == threshold[0])):
            target, threshold = "batchtopk", threshold[0]
            fields["k"] = k_int
    if target == "jumprelu":
        assert threshold is not None
        weights["log_threshold"] = threshold.clamp_min(_TINY).log()
    elif target == "batchtopk":
        assert threshold is not None
        # sciscope's BatchTopK treats any threshold < 0 as "not estimated": plain ReLU, like SAELens
        weights["threshold"] = threshold
    target, fields = _sciscope_fields(metadata, target, fields)
    return _build(target, fields, weights, where, device=device)


def to_saelens(
    sae: SparseAutoencoder, *, metadata: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The SAELens ``cfg.json`` dict and ``sae_weights.safetensors`` tensors of ``sae``.

    ``relu`` -> ``standard``, ``topk`` -> ``topk``, ``jumprelu`` -> ``jumprelu`` (threshold
    ``exp(log_threshold)``), ``batchtopk`` -> ``jumprelu`` with its threshold in every latent (as
    SAELens saves its own BatchTopK SAEs, ``training_architecture`` ``"batchtopk"`` in the metadata).
    A registered subclass of one of these that leaves its encode alone (Matryoshka is BatchTopK at
    inference) exports as its base.  The sciscope config rides along in ``metadata["sciscope"]``, so
    :func:`load_sae` rebuilds the same architecture and training fields.

    Parameters
    ----------
    sae
        A sciscope SAE (any device).
    metadata
        Extra SAELens metadata, e.g. ``{"model_name": ..., "hook_name": ...}`` for SAEBench.

    Raises
    ------
    ConfigError
        An architecture SAELens cannot express.
    """
    name = sae.cfg.architecture
    arch = _encodes_like(sae)
    if arch is None:
        raise ConfigError(
            f"export to SAELens supports the architectures {sorted(SAELENS_EXPORT)} (and subclasses "
            f"that encode like them); this SAE is {name!r}"
        )
    dtype = sae.W_enc.dtype
    if dtype not in _DTYPE_NAMES:
        raise ConfigError(f"export to SAELens needs float weights, got {dtype}")
    with torch.no_grad():
        tensors = {
            name: getattr(sae, name).detach().cpu().contiguous().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")
        }
        meta: dict[str, Any] = dict(metadata or {})
        cfg: dict[str, Any] = {"architecture": SAELENS_EXPORT[arch], "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae}
        if arch == "topk":
            cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
        elif arch == "jumprelu":
            tensors["threshold"] = sae.threshold.detach().cpu().contiguous().clone()  # exactly what encode compares with
        elif arch == "batchtopk":
            # as it is: SAELens' ReLU(pre) * (pre > t) is plain ReLU for t = -1 ("not estimated"), as here
            t = sae.threshold.detach().cpu()
            tensors["threshold"] = t.expand(sae.cfg.d_sae).to(dtype).contiguous()
            meta.update(
                training_architecture=_SAELENS_TRAINING_NAMES.get(name, name),
                training_architecture_details={"k": sae.cfg.k},
            )
    meta.update(sae_lens_version=SAELENS_LAYOUT_VERSION, sciscope={"config": sae.cfg.to_dict()})
    cfg.update(
        dtype=_DTYPE_NAMES[dtype],
        device="cpu",
        # sciscope folds its input normalisation into the weights after training: raw activations in
        apply_b_dec_to_input=True,
        normalize_activations="none",
        reshape_activations="none",
        metadata=meta,
    )
    _check_finite(tensors, f"SAE ({name})", "; refusing to export")
    return cfg, tensors


def _encodes_like(sae: SparseAutoencoder) -> str | None:
    """The exportable architecture whose encode ``sae`` runs unchanged, or None.

    ``sae`` must be the class registered under its config's name, and that class either one of
    :data:`SAELENS_EXPORT` or a subclass of one that overrides none of :data:`_ENCODE_METHODS`.
    """
    if SAE_REGISTRY.get(sae.cfg.architecture) is not type(sae):
        return None
    return _kind(type(sae))


def _kind(cls: type[SparseAutoencoder]) -> str | None:
    """The architecture of :data:`SAELENS_EXPORT` that ``cls`` is, or encodes exactly like."""
    for arch in SAELENS_EXPORT:
        base = SAE_REGISTRY.get(arch)
        if base is not None and issubclass(cls, base):
            if cls is base or all(getattr(cls, m) is getattr(base, m) for m in _ENCODE_METHODS):
                return arch
    return None


def _carried(metadata: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The registered architecture and config :func:`export_saelens` put in the metadata, if any."""
    carried = metadata.get("sciscope")
    cfg = carried.get("config") if isinstance(carried, dict) else None
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not isinstance(name, str) or name not in SAE_REGISTRY:
        return None
    return name, cfg


def _carried_kind(metadata: Mapping[str, Any]) -> str | None:
    carried = _carried(metadata)
    return None if carried is None else _kind(SAE_REGISTRY[carried[0]])


def export_saelens(
    sae: SparseAutoencoder, path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``sae`` as a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``), atomically.

    ``sae_lens.SAE.load_from_disk(path)`` reads it with the same encodings, and so does
    :func:`~sciscope.core.sae.load_sae` (the same sciscope architecture and config, the dead-latent
    counters reset).  The safetensors metadata records ``sha256_tensors`` and ``sha256_config`` as
    sciscope's own files do; SAELens ignores them, :func:`load_sae` checks them.

    Parameters
    ----------
    sae
        The SAE (see :func:`to_saelens` for the architectures).
    path
        The directory to write; an existing one is replaced.
    metadata
        Extra SAELens metadata (``model_name``, ``hook_name``, ...).

    Returns
    -------
    Path
        The directory written.
    """
    cfg, tensors = to_saelens(sae, metadata=metadata)
    meta = {"format": "pt", CHECKSUM_KEY: tensors_sha256(tensors), CONFIG_CHECKSUM_KEY: config_sha256(cfg)}
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(tensors, tmp / SAELENS_WEIGHTS_FILE, metadata=meta)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------- sparsify


def load_sparsify(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an EleutherAI sparsify SAE directory (``cfg.json`` + ``sae.safetensors``) as TopK.

    sparsify encodes ``TopK_k(ReLU((x - b_dec) @ encoder.weight.T + encoder.bias))`` and decodes
    ``f @ W_dec + b_dec``: sciscope's TopK with ``W_enc = encoder.weight.T``.  ``multi_topk`` is a
    training loss only and loads.

    Raises
    ------
    ConfigError
        ``activation="groupmax"``, ``transcode=true`` or ``skip_connection=true`` (a ``W_skip``):
        not an autoencoder sciscope can express.
    """
    path = Path(path)
    cfg_path, weights_path = path / CONFIG_FILE, path / SPARSIFY_WEIGHTS_FILE
    raw = _read_json(cfg_path)
    where = str(cfg_path)
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise ConfigError(f"{where}: activation={activation!r} has no sciscope equivalent (only 'topk' loads)")
    if raw.get("transcode", False):
        raise ConfigError(
            f"{where}: transcode=true: a transcoder predicts a module's output from its input; "
            "sciscope loads autoencoders only"
        )
    if raw.get("skip_connection", False):
        raise ConfigError(f"{where}: skip_connection=true (W_skip) has no sciscope equivalent")
    tensors, _ = _read_safetensors(weights_path)
    d_in = _int_field(raw, "d_in", where)
    k = _int_field(raw, "k", where)
    num_latents = raw.get("num_latents") or d_in * _int_field({"expansion_factor": 32, **raw}, "expansion_factor", where)
    d_sae = _int_value(num_latents, "num_latents", where)
    _check_tensor_names(tensors, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, set(), weights_path, "a sparsify SAE")
    _check_finite(tensors, str(weights_path))
    weights = {
        "W_enc": _as64(tensors["encoder.weight"], (d_sae, d_in), "encoder.weight", weights_path).T,
        "b_enc": _as64(tensors["encoder.bias"], (d_sae,), "encoder.bias", weights_path),
        "W_dec": _as64(tensors["W_dec"], (d_sae, d_in), "W_dec", weights_path),
        "b_dec": _as64(tensors["b_dec"], (d_in,), "b_dec", weights_path),
    }
    normalize_decoder = raw.get("normalize_decoder", True)
    fields = {"d_in": d_in, "d_sae": d_sae, "k": k, "normalize": "none"}
    if isinstance(normalize_decoder, bool):
        fields["normalize_decoder"] = normalize_decoder
    return _build("topk", fields, weights, where, device=device)


# ---------------------------------------------------------------------------- dictionary_learning

# dict_class -> (sciscope architecture, required tensors)
_DL_CLASSES: dict[str, tuple[str, set[str]]] = {
    "AutoEncoder": ("relu", {"bias", "encoder.weight", "encoder.bias", "decoder.weight"}),
    "AutoEncoderNew": ("relu", {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}),
    "AutoEncoderTopK": ("topk", {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec"}),
    "BatchTopKSAE": ("batchtopk", {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "threshold"}),
    "MatryoshkaBatchTopKSAE": ("batchtopk", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
    "JumpReluAutoEncoder": ("jumprelu", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
}


def load_dictionary_learning(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> SparseAutoencoder:
    """Load a dictionary_learning SAE directory (``config.json`` + ``ae.safetensors``).

    dictionary_learning saves ``ae.pt``, a pickle, which is never opened here (unpickling can run
    code); convert it to ``ae.safetensors`` once (the error message gives the command).  The codes
    are those of the library's ``load_dictionary``:

    ``AutoEncoder`` -> ``relu`` (decoder columns normalised, norms folded into the encoder, as its
    ``from_pretrained`` does), ``AutoEncoderNew`` -> ``relu`` (no input centring),
    ``AutoEncoderTopK`` -> ``topk`` (per-sample top k), ``BatchTopKSAE`` and
    ``MatryoshkaBatchTopKSAE`` -> ``batchtopk`` (inference threshold; a Matryoshka SAE's nested
    groups only shape its training), ``JumpReluAutoEncoder`` -> ``jumprelu`` (no input centring).

    Raises
    ------
    SciscopeError
        Only ``ae.pt`` is there (the message says how to convert it), or files are missing.
    ConfigError
        A ``dict_class`` sciscope cannot express (``GatedAutoEncoder``, ...).
    """
    path = Path(path)
    cfg_path, weights_path = path / DICTIONARY_LEARNING_CONFIG, path / DICTIONARY_LEARNING_WEIGHTS
    if not weights_path.is_file():
        if (path / DICTIONARY_LEARNING_PICKLE).is_file():
            raise SciscopeError(
                f"{path / DICTIONARY_LEARNING_PICKLE} is a torch pickle, which sciscope never unpickles "
                f"(loading a pickle can run arbitrary code); {_DL_CONVERT}, then load {path} again"
            )
        raise SciscopeError(f"{weights_path} does not exist: not a dictionary_learning SAE directory")
    raw = _read_json(cfg_path)
    where = str(cfg_path)
    trainer = raw.get("trainer")
    if not isinstance(trainer, dict):
        raise ConfigError(f"{where}: no 'trainer' section (dictionary_learning writes its config there)")
    dict_class = trainer.get("dict_class")
    if dict_class not in _DL_CLASSES:
        raise ConfigError(
            f"{where}: trainer.dict_class={dict_class!r} has no sciscope equivalent "
            f"(sciscope reads {sorted(_DL_CLASSES)})"
        )
    target, required = _DL_CLASSES[dict_class]
    tensors, _ = _read_safetensors(weights_path)
    _check_tensor_names(tensors, required, {"k", "threshold", "group_sizes"}, weights_path, f"a {dict_class}")
    _check_finite(tensors, str(weights_path))
    if "encoder.weight" in tensors:
        d_sae, d_in = tensors["encoder.weight"].shape
    else:
        d_in, d_sae = tensors["W_enc"].shape
    for key, value in (("activation_dim", d_in), ("dict_size", d_sae)):
        if key in trainer and trainer[key] != value:
            raise ShapeError(f"{where}: trainer.{key}={trainer[key]} but {weights_path.name} holds {value}")

    def t(name: str, shape: tuple[int, ...]) -> Tensor:
        return _as64(tensors[name], shape, name, weights_path)

    if "encoder.weight" in tensors:
        W_enc, b_enc = t("encoder.weight", (d_sae, d_in)).T, t("encoder.bias", (d_sae,))
        W_dec = t("decoder.weight", (d_in, d_sae)).T
    else:
        W_enc, b_enc, W_dec = t("W_enc", (d_in, d_sae)), t("b_enc", (d_sae,)), t("W_dec", (d_sae, d_in))
    fields: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "normalize": "none"}
    weights: dict[str, Tensor] = {}
    if dict_class == "AutoEncoder":
        b_dec = t("bias", (d_in,))
        norms = W_dec.norm(dim=1)  # (d_sae,)
        # from_pretrained(normalize_decoder=True): skipped when the norms are already ~1
        if not torch.allclose(norms.float(), torch.ones(d_sae)):
            W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    elif dict_class == "AutoEncoderNew":
        b_dec = t("decoder.bias", (d_in,))
        b_enc = b_enc + b_dec @ W_enc  # encode is ReLU(encoder(x)): no b_dec subtracted
    elif dict_class == "JumpReluAutoEncoder":
        b_dec = t("b_dec", (d_in,))
        b_enc = b_enc + b_dec @ W_enc  # apply_b_dec_to_input is False for files it saved
        weights["log_threshold"] = t("threshold", (d_sae,)).clamp_min(_TINY).log()
    else:  # the TopK family
        b_dec = t("b_dec", (d_in,))
        k = tensors["k"].item() if "k" in tensors else trainer.get("k")
        if "k" in tensors and "k" in trainer and trainer["k"] != k:
            raise ConfigError(f"{where}: trainer.k={trainer['k']} but {weights_path.name} holds k={k}")
        fields["k"] = _int_value(k, "trainer.k", where)
        if target == "batchtopk":
            weights["threshold"] = _as64(tensors["threshold"], (), "threshold", weights_path)
    weights.update(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    return _build(target, fields, weights, where, device=device)


# --------------------------------------------------------------------------------------- helpers


def _build(
    architecture: str,
    fields: dict[str, Any],
    weights: Mapping[str, Tensor],
    where: str,
    *,
    device: str | torch.device,
) -> SparseAutoencoder:
    """A sciscope SAE of ``architecture`` with ``weights`` (sciscope names and layouts) in eval mode."""
    if architecture != "relu" and "normalize_decoder" not in fields:
        # Unit-norm rows are what the training constraint would keep; say so only when it holds.
        norms = weights["W_dec"].norm(dim=1)
        fields["normalize_decoder"] = bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-4))
    try:
        cfg = sae_config(architecture, **fields)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    sae = create_sae(cfg, seed=0)
    state = sae.state_dict()  # fresh training state (dead-latent counters) for everything not given
    for name, value in weights.items():
        if name not in state:
            raise SciscopeError(f"{where}: internal: sciscope's {architecture!r} SAE has no tensor {name!r}")
        if tuple(value.shape) != tuple(state[name].shape):
            raise ShapeError(
                f"{where}: tensor {name!r} has shape {tuple(value.shape)}, the {architecture!r} SAE "
                f"expects {tuple(state[name].shape)}"
            )
        state[name] = value.to(state[name].dtype)
    _check_finite(state, where)
    sae.load_state_dict(state, strict=True)
    return sae.to(device).eval()


def _sciscope_fields(
    metadata: Mapping[str, Any], target: str, fields: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The architecture and config :func:`export_saelens` carried in the metadata, else ``target, fields``.

    The carried config restores the architecture (a subclass of ``target`` that encodes like it,
    e.g. Matryoshka for BatchTopK) and the training fields (``normalize``, ``aux_k``, ...); the
    shapes and ``k`` stay those the SAELens file encodes with.  A carried config that does not
    encode like ``target`` (an edited file, an unregistered architecture) is ignored.
    """
    carried = _carried(metadata)
    if carried is None or _kind(SAE_REGISTRY[carried[0]]) != target:
        return target, fields  # none, or one that encodes otherwise than the SAELens file says
    name, cfg = carried
    out = {k: v for k, v in cfg.items() if k != "architecture"}
    out.update({k: v for k, v in fields.items() if k in ("d_in", "d_sae", "k")})
    return name, out


def _fold_decoder_norms(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Codes ``pre * ||W_dec[i]||`` decoded through ``W_dec[i] / ||W_dec[i]||``, as plain weights."""
    norms = W_dec.norm(dim=1)  # (d_sae,)
    return W_enc * norms, b_enc * norms, W_dec / norms[:, None]


def _saelens_scaler(path: Path) -> float | None:
    scaler = _peek_json(path / SAELENS_SCALER_FILE)
    if scaler is None:
        return None
    if scaler.get("has_whitening"):
        raise ConfigError(
            f"{path / SAELENS_SCALER_FILE}: has_whitening=true: a whitening checkpoint; load the final "
            "SAE SAELens writes after training (it folds the whitening in)"
        )
    return scaler.get("scaling_factor")


def _check_tensor_names(
    tensors: Mapping[str, Tensor], required: set[str], optional: set[str], path: Path, what: str
) -> None:
    missing = sorted(required - set(tensors))
    extra = sorted(set(tensors) - required - optional)
    if missing or extra:
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise SciscopeError(
            f"{path}: tensors {sorted(tensors)} are not those of {what} ({'; '.join(parts)})"
        )


def _as64(t: Tensor, shape: tuple[int, ...], name: str, path: Path) -> Tensor:
    """The tensor in float64 (folds are computed there, then rounded once), shape checked."""
    if tuple(t.shape) != shape:
        raise ShapeError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t.detach().to(torch.float64)


def _int_field(raw: Mapping[str, Any], name: str, where: str) -> int:
    if name not in raw:
        raise ConfigError(f"{where}: no {name!r} field")
    return _int_value(raw[name], name, where)


def _int_value(value: Any, name: str, where: str) -> int:
    out = _integral(value)
    if out is None or out < 1:
        raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
    return out


def _integral(value: Any) -> int | None:
    """``value`` as an int when it is one (SAELens stores BatchTopK's k as a float), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _is_saelens_6(version: Any) -> bool:
    if not isinstance(version, str):
        return False
    head = version.strip().lstrip("v").split(".")[0]
    return head.isdigit() and int(head) >= 6


def _peek_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None when it is missing or not a readable object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SciscopeError(f"{path} does not exist: not a saved SAE directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SciscopeError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SciscopeError(f"{path} does not hold a JSON object")
    return data


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise SciscopeError(f"{path} does not exist: not a saved SAE directory")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise SciscopeError(f"{path} cannot be read as safetensors ({exc})") from None
    return tensors, meta

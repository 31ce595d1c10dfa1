"""What every sparse autoencoder shares: config, registry, weights, loss skeleton, dead latents, I/O.

An SAE maps an activation ``x`` (``d_in``) to a sparse code ``f`` (``d_sae``) and back::

    pre   = (x - b_dec) @ W_enc + b_enc        # (B, d_sae)   pre-encoder bias subtraction
    f     = sigma(pre)                          # (B, d_sae)   sigma: ReLU, TopK, BatchTopK, JumpReLU
    x_hat = f @ W_dec + b_dec                   # (B, d_in)

Each architecture is a config dataclass plus a module subclass, registered by name with
:func:`register_sae`; the name is written into ``cfg.json`` so :func:`load_sae` rebuilds the same
class (a TopK SAE reloads as TopK).  Weights live in ``sae.safetensors``: no pickle, ever.  Its
metadata records a SHA-256 of the tensors (``sha256_tensors``) that :func:`load_sae` checks, and
neither side accepts NaN/inf weights.

Conventions
-----------
* The reconstruction term of the *training loss* is the squared error summed over features and
  averaged over samples (``recon``), as in Anthropic's and SAELens' recipes, so sparsity
  coefficients from the literature keep their meaning.  The reported ``mse`` is the mean over
  elements (``recon / d_in``), the same number :func:`~sciscope.core.sae.evaluate_sae` returns.
* A latent "fires" when its activation is non-zero.  ``samples_since_fired`` counts, per latent,
  the training samples seen since it last fired; it is dead once that reaches ``cfg.dead_after``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sciscope.core.errors import (
    ConfigError,
    IntegrityError,
    NonFiniteError,
    SciscopeError,
    ShapeError,
    close_matches,
)
from sciscope.core.io import atomic_path

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
FORMAT_VERSION = 1
# Safetensors metadata key of the weights' content hash; files written before it existed load unchecked.
CHECKSUM_KEY = "sha256_tensors"
# ... and of cfg.json's content (an edited ``k`` keeps every shape, so the tensors' hash cannot see it).
CONFIG_CHECKSUM_KEY = "sha256_config"

NormalizeMethod = Literal["none", "scalar", "standardize"]
_NORMALIZE_METHODS = ("none", "scalar", "standardize")


# --------------------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class SAEConfig:
    """Fields every architecture shares.

    Parameters
    ----------
    d_in
        Width of the activations the SAE reads.
    d_sae
        Number of latents (dictionary size).
    normalize
        How inputs are normalised during training: ``"none"``; ``"scalar"`` (subtract the mean,
        then scale so the mean norm is ``sqrt(d_in)``, as SAELens); ``"standardize"`` (per-dimension
        mean and standard deviation).  The statistics are folded into the weights after training,
        so a trained SAE always takes *raw* activations; this field records how it was trained.
    dead_after
        A latent that has not fired for this many training samples counts as dead.
    aux_k
        Number of dead latents the AuxK loss may use per sample (Gao et al. 2024 use 512).
    aux_coeff
        Weight of the AuxK loss; ``0`` switches it off.
    normalize_decoder
        Keep decoder rows at unit norm (gradient component along each row removed before the
        step, rows re-normalised after it).
    """

    architecture: ClassVar[str] = ""  # set by @register_sae

    d_in: int
    d_sae: int
    normalize: NormalizeMethod = "scalar"
    dead_after: int = 100_000
    aux_k: int = 512
    aux_coeff: float = 0.0
    normalize_decoder: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        _check_int(self, "d_in", minimum=1)
        _check_int(self, "d_sae", minimum=1)
        if self.normalize not in _NORMALIZE_METHODS:
            raise ConfigError(
                f"{type(self).__name__}.normalize={self.normalize!r} is not one of {_NORMALIZE_METHODS}"
            )
        _check_int(self, "dead_after", minimum=1)
        _check_int(self, "aux_k", minimum=1)
        _check_float(self, "aux_coeff", minimum=0.0)
        _check_bool(self, "normalize_decoder")

    def to_dict(self) -> dict[str, Any]:
        """Every field plus ``architecture``: what ``cfg.json`` holds."""
        return {"architecture": self.architecture, **dataclasses.asdict(self)}


def _check_int(cfg: SAEConfig, name: str, *, minimum: int, maximum: int | None = None) -> None:
    value = getattr(cfg, name)
    # bool is an int subclass; True as a width is almost surely a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{type(cfg).__name__}.{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{type(cfg).__name__}.{name}={value} must be {bound}")


def _check_float(
    cfg: SAEConfig, name: str, *, minimum: float, maximum: float | None = None, strict: bool = False
) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{type(cfg).__name__}.{name} must be a finite number, got {value!r}")
    too_low = value <= minimum if strict else value < minimum
    if too_low or (maximum is not None and value > maximum):
        low = f"> {minimum}" if strict else f">= {minimum}"
        bound = low if maximum is None else f"{low} and <= {maximum}"
        raise ConfigError(f"{type(cfg).__name__}.{name}={value} must be {bound}")


def _check_bool(cfg: SAEConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        raise ConfigError(f"{type(cfg).__name__}.{name} must be true or false, got {value!r}")


# ------------------------------------------------------------------------------------- registry

SAE_REGISTRY: dict[str, type[SparseAutoencoder]] = {}

_S = TypeVar("_S", bound="type[SparseAutoencoder]")


def register_sae(name: str) -> Callable[[_S], _S]:
    """Class decorator: register an SAE module class (and its ``config_class``) under ``name``.

    Examples
    --------
    >>> @register_sae("mine")  # doctest: +SKIP
    ... class MySAE(SparseAutoencoder):
    ...     config_class = MyConfig
    """

    def decorator(cls: _S) -> _S:
        if name in SAE_REGISTRY and SAE_REGISTRY[name] is not cls:
            raise ConfigError(f"an SAE architecture named {name!r} is already registered")
        config_class = getattr(cls, "config_class", None)
        if not (isinstance(config_class, type) and issubclass(config_class, SAEConfig)):
            raise ConfigError(f"{cls.__name__}.config_class must be an SAEConfig subclass")
        config_class.architecture = name
        SAE_REGISTRY[name] = cls
        return cls

    return decorator


def available_saes() -> list[str]:
    """Names of the registered SAE architectures, sorted."""
    return sorted(SAE_REGISTRY)


def _lookup(architecture: str) -> type[SparseAutoencoder]:
    try:
        return SAE_REGISTRY[architecture]
    except KeyError:
        hint = close_matches(str(architecture), SAE_REGISTRY)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(
            f"unknown SAE architecture {architecture!r}{did_you_mean}; "
            f"registered: {', '.join(available_saes())}"
        ) from None


def sae_fields(architecture: str) -> list[str]:
    """The config fields of a registered architecture (``"k"`` for TopK-like ones)."""
    return [f.name for f in dataclasses.fields(_lookup(architecture).config_class)]


def sae_config(architecture: str, **fields: Any) -> SAEConfig:
    """Build the config of the architecture named ``architecture`` from keyword fields.

    Raises
    ------
    ConfigError
        Unknown architecture (the message lists the registered ones), unknown or missing field,
        or an invalid value (the message names the field).
    """
    config_class = _lookup(architecture).config_class
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(
            f"unknown field(s) {unknown} for SAE architecture {architecture!r}; "
            f"its fields are {sorted(known)}"
        )
    missing = sorted(
        f.name
        for f in dataclasses.fields(config_class)
        if f.name not in fields
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"missing field(s) {missing} for SAE architecture {architecture!r}")
    return config_class(**fields)


def config_from_dict(data: Mapping[str, Any]) -> SAEConfig:
    """Inverse of :meth:`SAEConfig.to_dict`: dispatch on the ``architecture`` key."""
    data = dict(data)
    if "architecture" not in data:
        raise ConfigError("SAE config has no 'architecture' key")
    return sae_config(data.pop("architecture"), **data)


def create_sae(cfg: SAEConfig | Mapping[str, Any], *, seed: int | None = 0) -> SparseAutoencoder:
    """Instantiate the registered module class for ``cfg``, with weights initialised from ``seed``.

    Parameters
    ----------
    cfg
        A config instance, or a mapping with an ``architecture`` key and the fields.
    seed
        Seed of the (local) generator used for initialisation; ``None`` uses torch's global RNG.
        The global RNG state is never changed.
    """
    if isinstance(cfg, Mapping):
        cfg = config_from_dict(cfg)
    if not isinstance(cfg, SAEConfig):
        raise ConfigError(f"expected an SAEConfig or a mapping, got {type(cfg).__name__}")
    cls = _lookup(cfg.architecture)
    if not isinstance(cfg, cls.config_class):
        raise ConfigError(
            f"config {type(cfg).__name__} does not belong to architecture {cfg.architecture!r}"
        )
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    return cls(cfg, generator=generator)


def load_sae(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE written by :meth:`SparseAutoencoder.save`; returns it in eval mode.

    The class comes from ``cfg.json``'s ``architecture`` through the registry.  Only safetensors
    and JSON are read (no pickle, no ``torch.load``).  Directories written by SAELens, EleutherAI
    sparsify or dictionary_learning load too, as the sciscope SAE with the same encodings
    (:mod:`sciscope.core.sae.formats`).

    Raises
    ------
    SciscopeError
        A file is missing or unreadable, the tensors are not the architecture's, or the weights
        differ from the checksum recorded when they were written (files without one still load).
    ShapeError
        A tensor's shape disagrees with ``cfg.json`` (the message names both shapes).
    NonFiniteError
        A tensor holds NaN or inf.
    """
    from sciscope.core.sae import formats  # here: formats imports this module

    path = Path(path)
    if (fmt := formats.detect_format(path)) != "sciscope":
        return formats.load_foreign(path, fmt, device=device)
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise SciscopeError(f"{p} does not exist: not a saved SAE directory")
    try:
        cfg_dict = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SciscopeError(f"{cfg_path} is not valid JSON ({exc})") from None
    try:
        cfg = config_from_dict(cfg_dict)
    except ConfigError as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from None
    sae = create_sae(cfg, seed=0)
    try:
        # CPU first: the checksum reads host memory; the module moves to ``device`` at the end.
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise SciscopeError(f"{weights_path} cannot be read as safetensors ({exc})") from None
    expected = sae.state_dict()
    if set(state) != set(expected):
        raise SciscopeError(
            f"{weights_path}: tensors {sorted(set(state))} do not match a {cfg.architecture!r} SAE "
            f"(expects {sorted(expected)})"
        )
    for name, want in expected.items():  # the module's own order: W_enc first
        if state[name].shape != want.shape:
            raise ShapeError(
                f"{weights_path}: tensor {name!r} has shape {tuple(state[name].shape)}, but {CONFIG_FILE} "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) expects {tuple(want.shape)}"
            )
    # after the shapes: a d_sae edit is better told as the shape it breaks
    verify_checksums(state, meta, cfg_dict, weights_path, cfg_path)
    _check_finite(state, str(weights_path))
    sae.load_state_dict(state, strict=True)
    return sae.to(device).eval()


def verify_checksums(tensors: Mapping[str, Tensor], meta: Mapping[str, str], cfg: Mapping[str, Any],
                     weights_path: Path, cfg_path: Path) -> None:
    """Raise :class:`IntegrityError` when the tensors or the config differ from the hashes recorded
    in the safetensors metadata at write time (files without them pass)."""
    recorded = meta.get(CHECKSUM_KEY)
    if recorded is not None and recorded != tensors_sha256(tensors):
        raise IntegrityError(f"{weights_path} changed since it was written: its tensors no longer match the "
                             f"{CHECKSUM_KEY} recorded when it was written (corrupted or edited file)")
    recorded = meta.get(CONFIG_CHECKSUM_KEY)
    if recorded is not None and recorded != config_sha256(cfg):
        raise IntegrityError(f"{cfg_path} changed since it was written: it no longer matches the "
                             f"{CONFIG_CHECKSUM_KEY} recorded in {weights_path.name} (edited or swapped config)")


def config_sha256(cfg: Mapping[str, Any]) -> str:
    """SHA-256 of a ``cfg.json`` mapping in canonical JSON (sorted keys), independent of its formatting."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def tensors_sha256(state: Mapping[str, Tensor]) -> str:
    """SHA-256 over name, dtype, shape and bytes of every tensor, in name order (hex digest).

    Independent of the file layout and of metadata, so it tells whether the *weights* are the ones
    that were written.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _check_finite(state: Mapping[str, Tensor], where: str, hint: str = "") -> None:
    """Raise :class:`NonFiniteError` naming the first floating tensor that holds NaN or inf."""
    for name in sorted(state):
        t = state[name]
        if t.is_floating_point():
            n_bad = int((~torch.isfinite(t)).sum())
            if n_bad:
                raise NonFiniteError(f"{where}: tensor {name!r} has {n_bad} NaN/inf values{hint}")


# ------------------------------------------------------------------------------------- modules


@dataclass
class TrainForward:
    """What an architecture's training forward pass hands to the shared loss."""

    x_hat: Tensor  # (B, d_in) reconstruction
    sparsity: Tensor  # () coefficient-weighted sparsity penalty (0 for k-sparse architectures)
    l0: Tensor  # () mean number of active latents per sample
    fired: Tensor  # (d_sae,) bool, latents active on at least one sample of the batch
    stats: dict[str, Tensor] = field(default_factory=dict)  # extra batch statistics (detached)


class SparseAutoencoder(nn.Module):
    """Base class: parameters, encode/decode, the shared loss, dead-latent bookkeeping, save.

    Subclasses set ``config_class`` and implement :meth:`_encode` (dense codes for a 2-D input);
    they may override :meth:`_train_forward` (sparse or batch-level training paths),
    :meth:`_forward` and :meth:`_sparsity_penalty`.
    """

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    #: True for architectures that predict another tensor than their input (transcoders): the
    #: trainer then accepts ``(input, target)`` batches and normalises the two sides separately.
    transcodes: ClassVar[bool] = False
    # Norm of the decoder rows at initialisation; ReLU SAEs start small (Anthropic, April 2024).
    init_decoder_norm: ClassVar[float] = 1.0

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        # Random unit directions as decoder rows, encoder tied to the decoder's transpose at
        # init (Gao et al. 2024; Conerly et al. 2024): every latent starts reading what it writes.
        w_dec = torch.randn(d_sae, d_in, generator=generator)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * self.init_decoder_norm
        self.W_enc = nn.Parameter(w_dec.t().clone())  # (d_in, d_sae)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))  # (d_sae,)
        self.W_dec = nn.Parameter(w_dec)  # (d_sae, d_in)
        self.b_dec = nn.Parameter(torch.zeros(d_in))  # (d_in,)
        # Training state, saved with the weights so a run can be inspected or resumed.
        self.register_buffer("samples_since_fired", torch.zeros(d_sae, dtype=torch.long))

    # ---- the maps ------------------------------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``(x - b_dec) @ W_enc + b_enc``: (..., d_in) -> (..., d_sae)."""
        x = self._check_input(x)
        inputs, bias = self._pre_act_operands(x.reshape(-1, self.cfg.d_in))
        return torch.addmm(bias, inputs, self.W_enc).reshape(*x.shape[:-1], self.cfg.d_sae)

    def _pre_act_operands(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        """``(inputs, bias)`` with pre-activations ``inputs @ W_enc + bias``; x2 is (B, d_in)."""
        b_in = self._input_bias()  # (d_in,)
        if torch.is_grad_enabled() and not x2.requires_grad and b_in.requires_grad:
            # Training: x @ W_enc + (b_enc - b_dec @ W_enc) is the same map, but autograd then needs
            # no (B, d_in) input gradient of the big matmul -- only a vector-matrix product for
            # b_dec (~1.3x per step). Inference keeps (x - b_dec) first: exact for large offsets.
            return x2, self.b_enc - b_in @ self.W_enc
        return x2 - b_in, self.b_enc

    def _input_bias(self) -> Tensor:
        """The pre-encoder bias subtracted from the input: ``b_dec`` (input and output share a
        space); a transcoder, whose output lives elsewhere, has its own (``b_in``)."""
        return self.b_dec

    def encode(self, x: Tensor) -> Tensor:
        """Sparse codes ``f``: (..., d_in) -> (..., d_sae)."""
        x2 = self._check_input(x).reshape(-1, self.cfg.d_in)
        return self._encode(x2).reshape(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, f: Tensor) -> Tensor:
        """Dense decode ``f @ W_dec + b_dec``: (..., d_sae) -> (..., d_in)."""
        if f.shape[-1] != self.cfg.d_sae:
            raise ShapeError(
                f"decode expects codes with last dimension d_sae={self.cfg.d_sae}, "
                f"got shape {tuple(f.shape)}"
            )
        f2 = f.reshape(-1, self.cfg.d_sae).to(self.W_dec.dtype)
        return torch.addmm(self.b_dec, f2, self.W_dec).reshape(*f.shape[:-1], self.cfg.d_in)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruct ``x``: returns ``(x_hat, f)`` of shapes (..., d_in) and (..., d_sae)."""
        x2 = self._check_input(x).reshape(-1, self.cfg.d_in)
        x_hat, f = self._forward(x2)
        return x_hat.reshape(x.shape), f.reshape(*x.shape[:-1], self.cfg.d_sae)

    def _encode(self, x: Tensor) -> Tensor:  # (B, d_in) -> (B, d_sae)
        raise NotImplementedError

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # (B, d_in) -> (B, d_in), (B, d_sae)
        f = self._encode(x)
        return self.decode(f), f

    def _check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x)
        if x.ndim < 1 or x.shape[-1] != self.cfg.d_in:
            raise ShapeError(
                f"{type(self).__name__} expects inputs with last dimension d_in={self.cfg.d_in}, "
                f"got shape {tuple(x.shape)}"
            )
        return x.to(self.W_enc.dtype)

    # ---- training ------------------------------------------------------------------------------

    def loss(
        self, x: Tensor, *, target: Tensor | None = None, sparsity_scale: float = 1.0, update_stats: bool = False
    ) -> dict[str, Tensor]:
        """Training loss on a batch ``x`` (B, d_in), in the space the SAE trains in.

        Parameters
        ----------
        x
            Batch of (already normalised) activations.
        target
            What the output should match, (B, d_in); None: ``x`` itself (an autoencoder).  A
            transcoder (:attr:`transcodes`) reads an MLP's input and matches its output.
        sparsity_scale
            Multiplier of the sparsity penalty (for a warm-up of the L1 / L0 coefficient).
        update_stats
            Update the dead-latent counters (and any running statistic such as BatchTopK's
            threshold) from this batch.  The trainer sets it; evaluation leaves it off.

        Returns
        -------
        dict
            Scalars: ``loss`` (what is minimised), ``recon`` (squared error summed over features,
            mean over samples), ``mse`` (mean over elements), ``sparsity`` (weighted penalty),
            ``aux`` (AuxK normalised MSE, unweighted), ``l0``, ``dead_fraction``.
        """
        x = self._check_input(x)
        if x.ndim != 2:
            raise ShapeError(f"loss expects a (batch, d_in) tensor, got shape {tuple(x.shape)}")
        dead = self.dead_mask()  # (d_sae,) judged before this batch counts
        out = self._train_forward(x)
        if target is not None:
            target = self._check_input(target)
            if target.shape != x.shape:
                raise ShapeError(f"loss: target has shape {tuple(target.shape)}, input {tuple(x.shape)}")
        err = (x if target is None else target) - out.x_hat  # (B, d_in)
        recon = err.pow(2).sum(dim=-1).mean()
        if self.cfg.aux_coeff > 0:
            aux = self.aux_loss(x, err.detach(), dead)
        else:
            aux = recon.new_zeros(())
        loss = recon + sparsity_scale * out.sparsity + self.cfg.aux_coeff * aux + self._extra_loss(out)
        if update_stats:
            self.update_stats(out, n_samples=x.shape[0])
        return {
            "loss": loss,
            "recon": recon.detach(),
            "mse": recon.detach() / self.cfg.d_in,
            "sparsity": out.sparsity.detach(),
            "aux": aux.detach(),
            "l0": out.l0.detach(),
            "dead_fraction": self.dead_mask().float().mean(),
        }

    def _train_forward(self, x: Tensor) -> TrainForward:
        """Default training path: dense codes, dense decode."""
        f = self._encode(x)  # (B, d_sae)
        active = f != 0
        return TrainForward(
            x_hat=self.decode(f),
            sparsity=self._sparsity_penalty(f),
            l0=active.sum(dim=-1).float().mean(),
            fired=active.any(dim=0),
        )

    def _sparsity_penalty(self, f: Tensor) -> Tensor:
        return f.new_zeros(())

    def _extra_loss(self, out: TrainForward) -> Tensor:
        """Loss terms an architecture adds beyond reconstruction, sparsity and AuxK (none here).

        Matryoshka adds the reconstruction errors of its nested dictionary prefixes.  Not scaled
        by ``sparsity_scale``, and not part of the reported ``recon``.
        """
        return out.l0.new_zeros(())

    def aux_loss(self, x: Tensor, err: Tensor, dead: Tensor) -> Tensor:
        """AuxK loss (Gao et al. 2024): dead latents learn to explain the residual.

        The top ``aux_k`` pre-activations among dead latents (ReLU'd) reconstruct the residual
        ``e = x - x_hat`` through their decoder rows (no bias); the loss is the normalised MSE
        ``sum ||e - e_hat||^2 / sum ||e||^2`` over the batch.  ``e`` is detached, so only the dead
        latents' encoder columns and decoder rows receive gradient; ``b_dec`` is detached too, so
        the live reconstruction is untouched.  Zero when no latent is dead.
        """
        n_dead = int(dead.sum())
        if n_dead == 0:
            return err.new_zeros(())
        dead_idx = dead.nonzero().squeeze(1)  # (n_dead,)
        pre_dead = torch.addmm(
            self.b_enc[dead_idx], x - self._input_bias().detach(), self.W_enc[:, dead_idx]
        )  # (B, n_dead)
        vals, j = pre_dead.topk(min(self.cfg.aux_k, n_dead), dim=-1, sorted=False)  # (B, k_aux)
        # vals are bf16 under autocast; embedding_bag wants them in W_dec's dtype (fp32)
        weights = F.relu(vals).to(self.W_dec.dtype)  # (B, k_aux)
        e_hat = F.embedding_bag(dead_idx[j], self.W_dec, per_sample_weights=weights, mode="sum")
        return (err - e_hat).pow(2).sum() / err.pow(2).sum().clamp_min(1e-12)

    # ---- dead latents and other running statistics ----------------------------------------------

    def dead_mask(self) -> Tensor:
        """(d_sae,) bool: latents that have not fired for ``cfg.dead_after`` training samples."""
        return self.samples_since_fired >= self.cfg.dead_after

    @torch.no_grad()
    def update_stats(self, out: TrainForward, *, n_samples: int) -> None:
        """Count samples since each latent last fired (summed over ranks under DDP)."""
        fired = out.fired.to(torch.int32)
        n = torch.tensor(n_samples, device=fired.device, dtype=torch.long)
        if _distributed():
            # Every rank must agree on who is dead, or the AuxK losses would diverge.
            torch.distributed.all_reduce(fired, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.SUM)
        self.samples_since_fired += n
        self.samples_since_fired[fired.bool()] = 0

    # ---- unit-norm decoder ---------------------------------------------------------------------

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each decoder row (rows are kept at unit norm)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (d_sae, d_in)
        self.W_dec.grad -= (self.W_dec.grad * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder_rows(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # ---- normalisation folding -----------------------------------------------------------------

    @torch.no_grad()
    def fold_normalization(self, mean: Tensor, scale: Tensor) -> None:
        """Fold an input normalisation ``x_n = (x - mean) / scale`` into the weights.

        Afterwards the SAE reads raw ``x`` and writes raw ``x_hat``, with the same codes::

            (x - mean)/s - b_dec == (x - b_dec')/s          with b_dec' = s * b_dec + mean
            W_enc' = W_enc / s[:, None]    W_dec' = W_dec * s[None, :]    b_enc' = b_enc

        Thresholds on pre-activations (BatchTopK, JumpReLU) are unaffected.

        Parameters
        ----------
        mean
            (d_in,) or scalar.
        scale
            (d_in,) or scalar, positive.
        """
        dtype, dev = self.W_enc.dtype, self.W_enc.device
        mean = torch.as_tensor(mean, dtype=dtype, device=dev).expand(self.cfg.d_in)  # (d_in,)
        scale = torch.as_tensor(scale, dtype=dtype, device=dev).expand(self.cfg.d_in)  # (d_in,)
        if not bool((scale > 0).all()):
            raise ConfigError("normalisation scale must be positive to fold it into the weights")
        self.W_enc /= scale[:, None]
        self.W_dec *= scale[None, :]
        self.b_dec.copy_(scale * self.b_dec + mean)

    # ---- I/O -----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``sae.safetensors`` and ``cfg.json`` into the directory ``path``, atomically.

        Returns
        -------
        Path
            The directory written.

        Raises
        ------
        NonFiniteError
            A weight holds NaN or inf (training diverged); nothing is written.
        """
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.mkdir()
            self.write_files(tmp, name=path)
        return path

    def write_files(self, directory: Path, *, name: str | os.PathLike[str] | None = None) -> None:
        """Write ``sae.safetensors`` and ``cfg.json`` into an existing directory (not atomic).

        The safetensors metadata records ``architecture``, ``format_version``, ``sha256_tensors``
        (see :func:`tensors_sha256`) and ``sha256_config``, which :func:`load_sae` verifies.

        Parameters
        ----------
        directory
            Where the files go.
        name
            The directory to name in error messages (the final one when ``directory`` is a
            temporary folder).
        """
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        _check_finite(state, f"SAE for {name or directory}", "; refusing to save (training diverged?)")
        meta = {
            "architecture": self.cfg.architecture,
            "format_version": str(FORMAT_VERSION),
            CHECKSUM_KEY: tensors_sha256(state),
            CONFIG_CHECKSUM_KEY: config_sha256(self.cfg.to_dict()),
        }
        save_file(state, directory / WEIGHTS_FILE, metadata=meta)
        (directory / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.cfg.to_dict().items())
        return fields


def as_batch(batch: Any, index: int, d_in: int) -> Tensor:
    """Check one batch of activations and return it as a float tensor of shape (B, d_in).

    Raises
    ------
    ShapeError
        Not 2-D, empty, or a feature dimension other than ``d_in`` (the message names both).
    NonFiniteError
        NaN or inf anywhere in the batch (the message names the batch index).
    """
    if not isinstance(batch, Tensor):
        try:
            batch = torch.as_tensor(batch)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ShapeError(f"batch {index}: cannot make a tensor of {type(batch).__name__}") from exc
    if batch.ndim != 2 or batch.shape[0] == 0:
        raise ShapeError(
            f"batch {index}: expected a non-empty (batch, d_in={d_in}) tensor, got shape {tuple(batch.shape)}"
        )
    if batch.shape[1] != d_in:
        raise ShapeError(f"batch {index}: expected feature dimension d_in={d_in}, got {batch.shape[1]}")
    if not batch.is_floating_point():
        batch = batch.float()
    bad = ~torch.isfinite(batch)
    if bool(bad.any()):
        n_nan = int(torch.isnan(batch).sum())
        raise NonFiniteError(
            f"batch {index} has {int(bad.sum())} non-finite values ({n_nan} NaN, "
            f"{int(bad.sum()) - n_nan} inf), first at row {int(bad.any(dim=1).nonzero()[0])}"
        )
    return batch


def is_pair(batch: Any) -> bool:
    """A transcoder's ``(input, target)`` batch: a 2-*tuple* of tensors or arrays (a list of two
    tensors stays a list of batches, as :func:`~sciscope.core.sae.evaluate_sae` has always read it)."""
    return isinstance(batch, tuple) and len(batch) == 2 and all(isinstance(b, (Tensor, np.ndarray)) for b in batch)


def check_batch(batch: Any, index: int, d_in: int, *, paired: bool | None = None) -> "Tensor | tuple[Tensor, Tensor]":
    """:func:`~sciscope.core.sae.base.as_batch` for a batch or an ``(input, target)`` pair of them.

    ``paired`` True / False insists on pairs / plain batches (a stream must not mix them); None
    takes what comes.  Both sides of a pair are (B, d_in) with the same B.
    """
    pair = is_pair(batch)
    if paired is not None and pair != paired:
        want = "an (input, target) pair" if paired else "a plain (batch, d_in) tensor"
        raise ShapeError(f"batch {index}: expected {want} like the first batch, got {type(batch).__name__}")
    if not pair:
        return as_batch(batch, index, d_in)
    x, y = as_batch(batch[0], index, d_in), as_batch(batch[1], index, d_in)
    if x.shape[0] != y.shape[0]:
        raise ShapeError(f"batch {index}: {x.shape[0]} input rows but {y.shape[0]} target rows")
    return x, y


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()

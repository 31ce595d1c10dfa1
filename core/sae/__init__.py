"""Sparse autoencoders: architectures in a registry, Lightning training, metrics, safetensors I/O.

Examples
--------
>>> from sciscope.core.sae import TopKConfig, train_sae, evaluate_sae, load_sae  # doctest: +SKIP
>>> result = train_sae(TopKConfig(d_in=384, d_sae=4096, k=32), batches, max_steps=2000)
>>> evaluate_sae(result.sae, held_out)          # {'mse', 'explained_variance', 'l0', 'dead_fraction'}
>>> result.sae.save("runs/x/sae"); sae = load_sae("runs/x/sae")   # reloads as TopK
"""

from sciscope.core.sae.base import (
    SAE_REGISTRY,
    SAEConfig,
    SparseAutoencoder,
    TrainForward,
    available_saes,
    config_from_dict,
    create_sae,
    load_sae,
    register_sae,
    sae_config,
    sae_fields,
)

# Importing the architecture modules registers them.
from sciscope.core.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from sciscope.core.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from sciscope.core.sae.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from sciscope.core.sae.metrics import evaluate_sae
from sciscope.core.sae.relu import ReLUConfig, ReLUSAE
from sciscope.core.sae.topk import TopKConfig, TopKSAE
from sciscope.core.sae.transcoder import TopKTranscoder, TopKTranscoderConfig
from sciscope.core.sae.train import SAELightningModule, SAETrainResult, fit_normalization, train_sae

__all__ = [
    "SAE_REGISTRY",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "ReLUConfig",
    "ReLUSAE",
    "SAEConfig",
    "SAELightningModule",
    "SAETrainResult",
    "SparseAutoencoder",
    "TopKConfig",
    "TopKSAE",
    "TopKTranscoder",
    "TopKTranscoderConfig",
    "TrainForward",
    "available_saes",
    "config_from_dict",
    "create_sae",
    "evaluate_sae",
    "fit_normalization",
    "load_sae",
    "register_sae",
    "sae_config",
    "sae_fields",
    "train_sae",
]

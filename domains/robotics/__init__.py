"""Robotics: a tiny OpenVLA-style policy reaching coloured blocks, read and steered through its FFN neurons.

See :mod:`sciscope.domains.robotics.adapter` for the analyses and their controls.
"""

from .adapter import RoboticsAdapter
from .env import COLORS, EnvSpec, ReachEnv, Scenes, make_scenes, parse_instruction, render, simulate_demos
from .lens import CATEGORIES, CLUSTER_METRIC, ClusterRule, action_lens, cluster_clamp, neuron_categories, select_clusters
from .model import ActionCodec, PolicySpec, VLAPolicy, VLAVocab, build_policy, load_policy, rollout, save_policy, \
    train_policy

__all__ = [
    "CATEGORIES", "CLUSTER_METRIC", "COLORS", "ActionCodec", "ClusterRule", "EnvSpec", "PolicySpec", "ReachEnv",
    "RoboticsAdapter", "Scenes", "VLAPolicy", "VLAVocab", "action_lens", "build_policy", "cluster_clamp", "load_policy",
    "make_scenes", "neuron_categories", "parse_instruction", "render", "rollout", "save_policy", "select_clusters",
    "simulate_demos", "train_policy",
]

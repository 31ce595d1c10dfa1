"""Physics domain: a small space-time transformer over simulated physical regimes (see :mod:`.adapter`)."""

from .adapter import PhysicsAdapter
from .data import simulate_trajectories
from .diagnostics import RegimeClassifier, diagnose, flow_diagnostics, gray_scott_diagnostics, main_field
from .model import ModelSpec, WindowDataset, build_predictor, load_predictor, rollout, save_predictor, train_predictor
from .simulate import FlowSpec, GrayScottSpec, simulate_flow, simulate_gray_scott, velocity_to_vorticity
from .steering import RolloutScorer

__all__ = [
    "FlowSpec", "GrayScottSpec", "ModelSpec", "PhysicsAdapter", "RegimeClassifier", "RolloutScorer", "WindowDataset",
    "build_predictor", "diagnose", "flow_diagnostics", "gray_scott_diagnostics", "load_predictor", "main_field",
    "rollout", "save_predictor", "simulate_flow", "simulate_gray_scott", "simulate_trajectories", "train_predictor",
    "velocity_to_vorticity",
]

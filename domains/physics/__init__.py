"""Physics domain: a small space-time transformer over simulated physical regimes.

:class:`PhysicsAdapter` (registered as ``physics``) simulates Gray–Scott reaction–diffusion
(spots vs stripes) and forced 2-D incompressible flow (laminar vs vortex-rich), trains a
TimeSformer-style next-frame predictor on both with PyTorch Lightning, and steers its rollouts
with regime delta vectors (the Physics Steering recipe), scored by physical diagnostics and a
regime classifier fitted on them.
"""

from .adapter import PhysicsAdapter
from .data import REGIMES, TrajectorySet, simulate_trajectories
from .diagnostics import RegimeClassifier, diagnose, flow_diagnostics, gray_scott_diagnostics, main_field
from .model import (
    ModelSpec,
    PhysicsPredictor,
    WindowDataset,
    build_predictor,
    load_predictor,
    rollout,
    save_predictor,
    train_predictor,
)
from .steering import KEY_DIAGNOSTIC, RolloutScorer
from .simulate import (
    FlowSpec,
    GrayScottSpec,
    SimulationError,
    check_flow,
    check_gray_scott,
    simulate_flow,
    simulate_gray_scott,
    velocity_to_vorticity,
)

__all__ = [
    "KEY_DIAGNOSTIC", "REGIMES", "FlowSpec", "GrayScottSpec", "ModelSpec", "PhysicsAdapter", "PhysicsPredictor",
    "RegimeClassifier", "RolloutScorer", "SimulationError", "TrajectorySet", "WindowDataset", "build_predictor",
    "check_flow", "check_gray_scott", "diagnose", "flow_diagnostics", "gray_scott_diagnostics", "load_predictor",
    "main_field", "rollout", "save_predictor", "simulate_flow", "simulate_gray_scott",
    "simulate_trajectories", "train_predictor", "velocity_to_vorticity",
]

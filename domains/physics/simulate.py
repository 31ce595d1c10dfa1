"""Seeded numpy simulators of two 2-D systems, each with two regimes.

* **Gray–Scott reaction–diffusion** (Pearson 1993): ``u_t = D_u lap(u) - u v^2 + F (1 - u)``,
  ``v_t = D_v lap(v) + u v^2 - (F + k) v`` on a periodic grid (5-point Laplacian, forward Euler).
  Feed ``F`` and kill ``k`` rates pick the pattern: *spots* (e.g. F = 0.037, k = 0.065, Pearson's
  "mitosis") or *stripes* (labyrinths, e.g. F = 0.055, k = 0.062, "coral growth").
* **Incompressible 2-D flow** in vorticity form on the periodic square ``[0, 2 pi)^2``:
  ``w_t + u . grad(w) = nu lap(w) - mu w + f``, Kolmogorov forcing ``f = -A k_f cos(k_f y)``
  (the curl of the body force ``A sin(k_f y) x_hat``), pseudo-spectral with 2/3 de-aliasing and
  integrating-factor RK4 (viscosity and drag exact). High viscosity keeps the *laminar* shear
  ``u = A sin(k_f y) / (nu k_f^2 + mu)``; low viscosity makes it unstable and *vortex-rich*.

Both return two channels per frame (``u, v`` or the velocity), so one model reads both; every
trajectory has its own parameters and seeded initial condition. Stability is checked before any
step (:func:`check_gray_scott`, :func:`check_flow`: a ConfigError naming the parameter and limit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sciscope.core.errors import ConfigError, NonFiniteError

__all__ = ["FlowSpec", "GrayScottSpec", "SimulationError", "check_flow", "check_gray_scott", "flow_wavenumbers",
           "simulate_flow", "simulate_gray_scott", "velocity_to_vorticity"]

#: Largest advective CFL number ``dt * U_max / dx`` accepted for the flow (IF-RK4 is stable to ~2.8/pi).
CFL_MAX = 0.5


def _key(prefix: str, field: str) -> str:
    """The config key of a spec field: in a config the grid size is ``grid`` and ``n_frames`` is shared (no prefix)."""
    if prefix and field in ("n", "n_frames"):
        return "grid" if field == "n" else "n_frames"
    return prefix + field


class SimulationError(NonFiniteError):
    """A simulation that turned NaN/inf although its parameters passed the stability checks."""


@dataclass(frozen=True)
class GrayScottSpec:
    """Numerics shared by every Gray–Scott trajectory (per-trajectory F and k are arrays).

    Diffusion coefficients are in grid units (``dx = 1``); ``D_u = 0.1, D_v = 0.05`` keep
    Pearson's ratio 2 with patterns ~6-8 cells wide, so a 32 x 32 grid holds several wavelengths.
    """

    n: int = 32
    du: float = 0.1
    dv: float = 0.05
    dt: float = 1.0
    burn_in: int = 1500  # steps before the first saved frame (seeds grow into a pattern)
    frame_every: int = 50  # steps between saved frames
    n_frames: int = 20


def check_gray_scott(spec: GrayScottSpec, feed: Sequence[float] | np.ndarray, kill: Sequence[float] | np.ndarray,
                     *, prefix: str = "gs_") -> None:
    """Raise :class:`ConfigError` if the explicit scheme is unstable or a rate is out of range.

    Forward Euler with the 5-point Laplacian is stable for ``dt <= dx^2 / (4 D)``; the linear decay
    rates ``F`` and ``F + k`` need ``dt * (F + k) < 1``. ``prefix`` is how config keys are spelt
    (``gs_dt``, ``gs_du`` ...), so the message names the key to change. Every comparison is
    written so that NaN fails it.
    """
    feed, kill = np.asarray(feed, dtype=np.float64), np.asarray(kill, dtype=np.float64)
    for key, val in (("n", spec.n), ("burn_in", spec.burn_in), ("frame_every", spec.frame_every), ("n_frames", spec.n_frames)):
        if int(val) < (8 if key == "n" else 0 if key == "burn_in" else 1):
            raise ConfigError(f"physics: Gray-Scott '{_key(prefix, key)}' = {val!r} is too small")
    for key, val in (("du", spec.du), ("dv", spec.dv), ("dt", spec.dt)):
        if not np.isfinite(val) or val <= 0:
            raise ConfigError(f"physics: Gray-Scott '{prefix}{key}' must be a positive number, got {val!r}")
    d_max = max(spec.du, spec.dv)
    limit = 1.0 / (4.0 * d_max)
    if not spec.dt <= limit:
        which = "du" if spec.du >= spec.dv else "dv"
        raise ConfigError(
            f"physics: Gray-Scott '{prefix}dt' = {spec.dt:g} exceeds the explicit diffusion limit "
            f"dt <= dx^2 / (4 D) = {limit:.4g} set by '{prefix}{which}' = {d_max:g}; lower '{prefix}dt' or the diffusion"
        )
    for name, arr in (("feed", feed), ("kill", kill)):
        bad = ~((arr > 0) & (arr <= 0.2))  # NaN is bad too
        if bad.any():
            # from a config the ranges are checked (naming their keys) before this is reached
            raise ConfigError(f"physics: Gray-Scott {name} rate {float(arr[bad][0])!r} is outside (0, 0.2]")
    rate = float((feed + kill).max()) * spec.dt
    if not rate < 1.0:
        raise ConfigError(f"physics: Gray-Scott dt * (feed + kill) = {rate:.3g} >= 1 is unstable; lower '{prefix}dt'")


def _laplacian(a: np.ndarray) -> np.ndarray:
    """5-point periodic Laplacian over the last two axes (``dx = 1``)."""
    return (np.roll(a, 1, -1) + np.roll(a, -1, -1) + np.roll(a, 1, -2) + np.roll(a, -1, -2) - 4.0 * a)


def gray_scott_initial(n_traj: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``u = 1, v = 0`` with 3-6 random square seeds (``u = 0.5, v = 0.25``) plus 1% noise."""
    u = np.ones((n_traj, n, n))
    v = np.zeros((n_traj, n, n))
    for i in range(n_traj):
        for _ in range(int(rng.integers(3, 7))):
            s = int(rng.integers(3, 6))
            y0, x0 = (int(c) for c in rng.integers(0, n, 2))
            ys, xs = np.arange(y0, y0 + s) % n, np.arange(x0, x0 + s) % n
            u[i][np.ix_(ys, xs)] = 0.5
            v[i][np.ix_(ys, xs)] = 0.25
    u += 0.01 * rng.standard_normal(u.shape)
    v += 0.01 * rng.standard_normal(v.shape)
    return np.clip(u, 0, 1), np.clip(v, 0, 1)


def simulate_gray_scott(
    feed: Sequence[float] | np.ndarray,
    kill: Sequence[float] | np.ndarray,
    *,
    spec: GrayScottSpec = GrayScottSpec(),
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Simulate one Gray–Scott trajectory per ``(feed[i], kill[i])``, all at once.

    Returns
    -------
    ndarray
        ``(n_traj, n_frames, 2, n, n)`` float32: channel 0 is ``u``, channel 1 is ``v``.
    """
    from tqdm.auto import tqdm

    feed = np.asarray(feed, dtype=np.float64).reshape(-1)
    kill = np.asarray(kill, dtype=np.float64).reshape(-1)
    if feed.shape != kill.shape:
        raise ConfigError(f"physics: {feed.size} feed rates but {kill.size} kill rates")
    check_gray_scott(spec, feed, kill)
    rng = np.random.default_rng([seed, 0x6A5])
    u, v = gray_scott_initial(feed.size, spec.n, rng)
    F, K = feed[:, None, None], kill[:, None, None]
    out = np.empty((feed.size, spec.n_frames, 2, spec.n, spec.n), dtype=np.float32)
    total = spec.burn_in + spec.frame_every * (spec.n_frames - 1) + 1
    saved = 0
    for step in tqdm(range(total), desc="Gray-Scott", disable=not progress, unit="step"):
        if step >= spec.burn_in and (step - spec.burn_in) % spec.frame_every == 0:
            out[:, saved, 0], out[:, saved, 1] = u, v
            saved += 1
            if saved == spec.n_frames:
                break
        uvv = u * v * v
        u = u + spec.dt * (spec.du * _laplacian(u) - uvv + F * (1.0 - u))
        v = v + spec.dt * (spec.dv * _laplacian(v) + uvv - (F + K) * v)
    _check_finite(out, "Gray-Scott", {"feed": feed, "kill": kill})
    return out


@dataclass(frozen=True)
class FlowSpec:
    """Numerics shared by every flow trajectory (per-trajectory viscosity and forcing are arrays)."""

    n: int = 32
    dt: float = 0.02
    drag: float = 0.1  # linear (Rayleigh) friction mu
    k_forcing: int = 4  # Kolmogorov forcing wavenumber k_f
    init_amplitude: float = 1.0  # rms velocity of the random initial perturbation
    burn_in: float = 10.0  # time before the first saved frame
    frame_every: float = 0.5  # time between saved frames
    n_frames: int = 20


def flow_wavenumbers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer wavenumbers ``(ky, kx)`` of an ``rfft2`` on the ``[0, 2 pi)^2`` grid, shapes (n, 1), (1, n//2+1)."""
    ky = np.fft.fftfreq(n, 1.0 / n)[:, None]
    kx = np.fft.rfftfreq(n, 1.0 / n)[None, :]
    return ky, kx


def laminar_velocity(viscosity: np.ndarray, forcing: np.ndarray, spec: FlowSpec) -> np.ndarray:
    """Amplitude of the laminar Kolmogorov shear ``A / (nu k_f^2 + mu)`` per trajectory."""
    return np.abs(forcing) / (viscosity * spec.k_forcing**2 + spec.drag)


def check_flow(spec: FlowSpec, viscosity: Sequence[float] | np.ndarray, forcing: Sequence[float] | np.ndarray,
               *, prefix: str = "flow_") -> None:
    """Raise :class:`ConfigError` if the time step breaks the CFL limit or a parameter is invalid.

    The velocity bound is the laminar amplitude ``A / (nu k_f^2 + mu)`` plus three times the rms
    of the initial perturbation (its Gaussian peak), which bounds what the forced, damped flow
    reaches from its initial state. ``dt * U / dx`` must not exceed :data:`CFL_MAX`. Every
    comparison is written so that NaN fails it (a NaN amplitude must not pass the CFL check).
    """
    nu = np.asarray(viscosity, dtype=np.float64)
    amp = np.asarray(forcing, dtype=np.float64)
    if spec.n < 8 or spec.n % 2:
        raise ConfigError(f"physics: flow '{_key(prefix, 'n')}' must be an even grid size >= 8, got {spec.n!r}")
    if not 1 <= spec.k_forcing <= spec.n // 3:
        raise ConfigError(f"physics: flow '{prefix}k_forcing' = {spec.k_forcing!r} must lie in 1..{spec.n // 3} "
                          "(below the de-aliasing cut-off)")
    for key, val, lo in (("dt", spec.dt, 0.0), ("frame_every", spec.frame_every, 0.0)):
        if not np.isfinite(val) or val <= lo:
            raise ConfigError(f"physics: flow '{prefix}{key}' must be a positive number, got {val!r}")
    for key, val in (("drag", spec.drag), ("init_amplitude", spec.init_amplitude), ("burn_in", spec.burn_in)):
        if not (np.isfinite(val) and val >= 0):
            raise ConfigError(f"physics: flow '{prefix}{key}' must be a finite number >= 0, got {val!r}")
    if not spec.n_frames >= 1:
        raise ConfigError(f"physics: flow '{_key(prefix, 'n_frames')}' must be >= 1, got {spec.n_frames!r}")
    bad = ~(nu > 0) | ~np.isfinite(nu)
    if bad.any():
        # from a config the viscosity ranges are checked (naming their keys) before this is reached
        raise ConfigError(f"physics: flow viscosity {float(nu[bad][0])!r} must be a positive number")
    if not np.isfinite(amp).all():
        raise ConfigError(f"physics: flow forcing amplitude {float(amp[~np.isfinite(amp)][0])!r} must be finite "
                          f"(a config derives it from '{prefix}velocity', '{prefix}drag' and the viscosity ranges)")
    dx = 2 * np.pi / spec.n
    u_max = laminar_velocity(nu, amp, spec) + 3.0 * spec.init_amplitude
    cfl = spec.dt * u_max / dx
    worst = int(np.argmax(np.where(np.isnan(cfl), np.inf, cfl)))
    if not (cfl <= CFL_MAX).all():  # NaN fails
        raise ConfigError(
            f"physics: flow CFL number dt * U / dx = {cfl[worst]:.3g} exceeds {CFL_MAX} "
            f"('{prefix}dt' = {spec.dt:g}, U = {u_max[worst]:.3g} from viscosity {nu[worst]:g} and forcing "
            f"{amp[worst]:g}, dx = 2 pi / {spec.n}); lower '{prefix}dt' to <= {CFL_MAX * dx / u_max[worst]:.3g}"
        )


def _random_vorticity(n_traj: int, n: int, rms_velocity: float, rng: np.random.Generator) -> np.ndarray:
    """Band-limited random vorticity (``|k|`` in 1..4) with the given rms velocity, in rfft2 space."""
    ky, kx = flow_wavenumbers(n)
    k2 = ky**2 + kx**2
    band = (k2 >= 1) & (k2 <= 16)
    w_hat = (rng.standard_normal((n_traj, n, n // 2 + 1)) + 1j * rng.standard_normal((n_traj, n, n // 2 + 1))) * band
    w = np.fft.irfft2(w_hat, s=(n, n))
    w_hat = np.fft.rfft2(w)  # make it exactly Hermitian
    u = _velocity(w_hat, n)
    rms = np.sqrt((u**2).sum(1).mean((-1, -2)))[:, None, None] + 1e-12
    return w_hat * (rms_velocity / rms) if rms_velocity > 0 else w_hat * 0.0


def _velocity(w_hat: np.ndarray, n: int) -> np.ndarray:
    """Velocity ``(B, 2, n, n)`` from vorticity in rfft2 space: ``psi = w / |k|^2``, ``u = (psi_y, -psi_x)``."""
    ky, kx = flow_wavenumbers(n)
    k2 = ky**2 + kx**2
    k2[0, 0] = 1.0
    psi = w_hat / k2
    psi[..., 0, 0] = 0.0
    ux = np.fft.irfft2(1j * ky * psi, s=(n, n))
    uy = np.fft.irfft2(-1j * kx * psi, s=(n, n))
    return np.stack([ux, uy], axis=1)


def velocity_to_vorticity(vel: np.ndarray) -> np.ndarray:
    """Vorticity ``d(u_y)/dx - d(u_x)/dy`` of periodic velocity fields ``(..., 2, n, n)`` (spectral)."""
    n = vel.shape[-1]
    ky, kx = flow_wavenumbers(n)
    ux_hat = np.fft.rfft2(vel[..., 0, :, :])
    uy_hat = np.fft.rfft2(vel[..., 1, :, :])
    return np.fft.irfft2(1j * kx * uy_hat - 1j * ky * ux_hat, s=(n, n))


def simulate_flow(
    viscosity: Sequence[float] | np.ndarray,
    forcing: Sequence[float] | np.ndarray,
    *,
    spec: FlowSpec = FlowSpec(),
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Simulate one forced 2-D flow per ``(viscosity[i], forcing[i])``, all at once.

    The initial state is the laminar shear plus a random band-limited perturbation of rms
    velocity ``spec.init_amplitude``: at high viscosity it decays back to the shear, at low
    viscosity the shear breaks into vortices.

    Returns
    -------
    ndarray
        ``(n_traj, n_frames, 2, n, n)`` float32 velocity ``(u_x, u_y)``.
    """
    from tqdm.auto import tqdm

    nu = np.asarray(viscosity, dtype=np.float64).reshape(-1)
    amp = np.asarray(forcing, dtype=np.float64).reshape(-1)
    if nu.shape != amp.shape:
        raise ConfigError(f"physics: {nu.size} viscosities but {amp.size} forcing amplitudes")
    check_flow(spec, nu, amp)
    n, kf = spec.n, spec.k_forcing
    rng = np.random.default_rng([seed, 0xF10])
    ky, kx = flow_wavenumbers(n)
    k2 = ky**2 + kx**2
    dealias = (np.abs(ky) < n / 3) & (np.abs(kx) < n / 3)  # 2/3 rule
    y = 2 * np.pi * np.arange(n) / n
    # vorticity forcing -A k_f cos(k_f y), constant in x: (B, n, n) -> rfft2
    f_phys = -amp[:, None, None] * kf * np.cos(kf * y)[None, :, None] * np.ones((1, 1, n))
    f_hat = np.fft.rfft2(f_phys)
    lam = laminar_velocity(nu, amp, spec) * np.sign(amp + (amp == 0))
    w_lam = -lam[:, None, None] * kf * np.cos(kf * y)[None, :, None] * np.ones((1, 1, n))
    w_hat = np.fft.rfft2(w_lam) + _random_vorticity(nu.size, n, spec.init_amplitude, rng)
    lin = -(nu[:, None, None] * k2[None] + spec.drag)  # (B, n, n//2+1)
    e1, e2 = np.exp(lin * spec.dt), np.exp(lin * spec.dt / 2)

    def rhs(wh: np.ndarray) -> np.ndarray:
        ux, uy = _velocity(wh, n).swapaxes(0, 1)
        wx = np.fft.irfft2(1j * kx * wh, s=(n, n))
        wy = np.fft.irfft2(1j * ky * wh, s=(n, n))
        return -np.fft.rfft2(ux * wx + uy * wy) * dealias + f_hat

    steps_per_frame = max(1, int(round(spec.frame_every / spec.dt)))
    burn = int(round(spec.burn_in / spec.dt))
    total = burn + steps_per_frame * (spec.n_frames - 1) + 1
    out = np.empty((nu.size, spec.n_frames, 2, n, n), dtype=np.float32)
    saved = 0
    dt = spec.dt
    for step in tqdm(range(total), desc="flow", disable=not progress, unit="step"):
        if step >= burn and (step - burn) % steps_per_frame == 0:
            out[:, saved] = _velocity(w_hat, n)
            saved += 1
            if saved == spec.n_frames:
                break
        a = dt * rhs(w_hat)
        b = dt * rhs(e2 * (w_hat + a / 2))
        c = dt * rhs(e2 * w_hat + b / 2)
        d = dt * rhs(e1 * w_hat + e2 * c)
        w_hat = e1 * w_hat + (e1 * a + 2 * e2 * (b + c) + d) / 6
    _check_finite(out, "flow", {"viscosity": nu, "forcing": amp})
    return out


def _check_finite(out: np.ndarray, system: str, params: dict[str, np.ndarray]) -> None:
    bad = ~np.isfinite(out).reshape(out.shape[0], -1).all(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        desc = ", ".join(f"{k} = {v[i]:g}" for k, v in params.items())
        raise SimulationError(f"physics: {system} trajectory {i} ({desc}) turned NaN/inf; lower the time step")

"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", NeurIPS 2023) in numpy: the multistep predictor UniP-p with the corrector UniC, i.e. UniPC-p, in
data prediction, with both of the paper's B(h): ``bh1`` (B(h) = h) and ``bh2`` (B(h) = e^h - 1).

Notation, as in the paper and in diffusers' ``UniPCMultistepScheduler`` (whose numbers this reproduces,
``predict_x0=True``, ``lower_order_final=True``, ``final_sigmas_type="zero"``): ``alpha_t = sqrt(abar_t)``,
``sigma_t = sqrt(1 - abar_t)``, ``lambda_t = log(alpha_t / sigma_t)``; the timesteps ``t_0 > ... > t_{n-1}``
of ``respace``, then the final point ``t_n`` with ``alpha = 1, sigma = 0, lambda = +inf``;
``h_i = lambda_{t_{i+1}} - lambda_{t_i}``; ``m_i`` the data prediction (x0, clipped as the seed clips) at
``x_i``; ``r_k = (lambda_{t_{i-k}} - lambda_{t_i}) / h_i`` for the history. Step ``i``:

1. evaluate the denoiser at the predicted ``x_i`` (one call per step: UniC reuses it) and form ``m_i``;
2. UniC (i > 0): correct ``x_i`` from ``x_{i-1}``, ``m_{i-1}, m_{i-2}, ...`` and the new ``m_i``, at the
   order of the predictor that made ``x_i``;
3. UniP: predict ``x_{i+1}`` from the corrected ``x_i`` and ``m_i, m_{i-1}, ...``, at order
   ``min(order, i + 1, n - i)``: a warm-up from first order, and lower orders at the final steps; the last
   step (to sigma = 0) is first order and returns ``m_{n-1}``.

Both updates are linear in the sample and the data predictions, so each step's weights (the paper's
rho coefficients from the linear system R rho = b over phi-functions of h) are computed once per run in
float64, folded into float32 tables, and the loop only forms weighted sums.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .steps import Denoise, Machine, check_order, clip_x0, drive, start, step_loop, to_eps_x0
from .schedule import respace

VARIANTS = ("bh1", "bh2")


def _rhos(h: float, r: np.ndarray, p: int, variant: str, corrector: bool):
    """``h phi_1(h)``, ``B(h)`` and the rho coefficients of one UniP-p (``corrector=False``, p - 1 of them)
    or UniC-p (p of them) update, in data prediction (``hh = -h``), as the paper's B(h) formulation and
    diffusers' ``multistep_uni_{p,c}_bh_update`` form them, with their shortcuts rho = 1/2 for UniP-2 and
    UniC-1."""
    hh = -h
    h_phi_1 = np.expm1(hh)  # e^{hh} - 1
    b_h = hh if variant == "bh1" else h_phi_1
    if corrector and p == 1:
        return h_phi_1, b_h, np.array([0.5])
    if not corrector and p <= 2:
        return h_phi_1, b_h, np.full(p - 1, 0.5)
    # R[j, k] = r_k^j (the history's r, then 1), b_j = (j+1)! hh phi_{j+2}(hh) / B(h) with the exponential
    # integrators' phi_k(z) = (e^z - sum_{l<k} z^l / l!) / z^k, built by phi_{k+1} = (phi_k - 1/k!) / z
    R = np.vander(np.append(r, 1.0), p, increasing=True).T
    b = np.empty(p)
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for j in range(p):
        b[j] = h_phi_k * factorial / b_h
        factorial *= j + 2
        h_phi_k = h_phi_k / hh - 1 / factorial
    rhos = np.linalg.solve(R, b) if corrector else np.linalg.solve(R[:-1, :-1], b[:-1])
    return h_phi_1, b_h, rhos


def unipc_steps(
    x: np.ndarray,
    betas: np.ndarray,
    *,
    steps: int = 25,
    order: int = 2,
    variant: str = "bh2",
    cond: np.ndarray | None = None,
    spacing: str = "trailing",
    clip_denoised: bool = True,
    dynamic_thres_percentile: float | None = None,
    prediction_type: str = "eps",
    callback: Callable[[dict], None] | None = None,
) -> Machine:
    """``unipc`` as a step machine (the protocol: ``vdeploy.runtime.samplers``)."""
    check_order(order)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    x, betas, cond = start(x, betas, cond)
    timesteps = respace(len(betas), steps, spacing, betas=betas)
    abar = np.cumprod(1.0 - betas)[timesteps]
    n = len(timesteps)
    alpha = np.concatenate([np.sqrt(abar), [1.0]])
    sigma = np.concatenate([np.sqrt(1 - abar), [0.0]])
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # lam[n] = +inf
    p = np.minimum(np.minimum(order, np.arange(1, n + 1)), n - np.arange(n))  # UniP orders

    # UniP at step i: x_{i+1} = ratio[i] x_i + sum_k wp[i, k] m_{i-k}, from
    # x_{i+1} = sigma_{i+1}/sigma_i x_i - alpha_{i+1} h phi_1 m_i - alpha_{i+1} B(h) sum_k rho_k (m_{i-k} - m_i) / r_k
    wp = np.zeros((n, order))
    for i in range(n):
        h = lam[i + 1] - lam[i]
        r = (lam[i - np.arange(1, p[i])] - lam[i]) / h
        h_phi_1, b_h, rho = _rhos(h, r, p[i], variant, corrector=False)
        a = alpha[i + 1]
        wp[i, 0] = -a * h_phi_1
        if p[i] > 1:  # (B(h) is -inf for bh1 on the last step, which is first order)
            wp[i, 0] += a * b_h * np.sum(rho / r)
            wp[i, 1 : p[i]] = -a * b_h * rho / r
    # UniC at step i > 0, order q = p[i-1]: x_i^c = ratio[i-1] x_{i-1} + wc[i, 0] m_i + sum_k wc[i, 1 + k] m_{i-1-k},
    # from x_i^c = sigma_i/sigma_{i-1} x_{i-1} - alpha_i h phi_1 m_{i-1}
    #              - alpha_i B(h) (sum_{k<q} rho_k (m_{i-1-k} - m_{i-1}) / r_k + rho_q (m_i - m_{i-1}))
    wc = np.zeros((n, order + 1))
    for i in range(1, n):
        q = p[i - 1]
        h = lam[i] - lam[i - 1]
        r = (lam[i - 1 - np.arange(1, q)] - lam[i - 1]) / h
        h_phi_1, b_h, rho = _rhos(h, r, q, variant, corrector=True)
        a = alpha[i]
        wc[i, 0] = -a * b_h * rho[-1]
        wc[i, 1] = -a * h_phi_1 + a * b_h * (np.sum(rho[:-1] / r) + rho[-1])
        wc[i, 2 : q + 1] = -a * b_h * rho[:-1] / r
    f32 = lambda v: np.asarray(v, dtype=np.float32)  # noqa: E731
    recip, recipm1 = f32(1 / alpha[:n]), f32(sigma[:n] / alpha[:n])  # m = (x - sigma eps) / alpha
    ratio, wp, wc = f32(sigma[1:] / sigma[:n]), f32(wp), f32(wc)
    history = []  # m_i, m_{i-1}, ... (newest first), at most `order`
    x_last = None  # the corrected sample the last UniP step started from

    def update(i, x, eps):
        nonlocal x_last
        # 1. the data prediction at the (uncorrected) sample the denoiser saw
        eps, m = to_eps_x0(eps, x, recip[i], recipm1[i], prediction_type)
        if clip_denoised:
            m = clip_x0(m, dynamic_thres_percentile)
        # 2. UniC: correct x_i with m_i (weights as Python floats: float32 arithmetic in any namespace)
        if i > 0:
            w = [float(v) for v in wc[i]]
            x = float(ratio[i - 1]) * x_last + w[0] * m
            for k in range(p[i - 1]):
                x += w[k + 1] * history[k]  # x is this step's new array
        history.insert(0, m)
        del history[order:]
        # 3. UniP: predict x_{i+1}
        x_last = x
        w = [float(v) for v in wp[i]]
        x = float(ratio[i]) * x + w[0] * m
        for k in range(1, p[i]):
            x += w[k] * history[k]
        return x, m, eps

    return step_loop(x, cond, timesteps, update, callback)


def unipc(denoise: Denoise, x: np.ndarray, betas: np.ndarray, **kwargs) -> np.ndarray:
    """UniPC-p (Zhao et al. 2023): multistep UniP predictor with the UniC corrector, data prediction.

    Deterministic, one denoiser call per step. The first steps warm up from first order and the final
    steps lower the order again (the last one, to sigma = 0, returns x0), as diffusers'
    ``UniPCMultistepScheduler(solver_order=order, solver_type=variant)``. Clipping applies to every data
    prediction, before it enters an update.

    Args:
        steps, spacing: the timesteps, ``respace(T, steps, spacing, betas=betas)`` (default 25, trailing).
        order: the UniP order p, 1 to 3 (default 2; UniC raises the accuracy to p + 1).
        variant: ``"bh2"`` (default; B(h) = e^h - 1) or ``"bh1"`` (B(h) = h; the paper's pick for
            unconditional sampling under 10 steps).
        The rest as in ``ddpm``.
    """
    return drive(unipc_steps(x, betas, **kwargs), denoise)

"""The tests' oracle for the fused loss: numpy in float64, written from the formula with the gradients
derived by hand, sharing no code with rmfast (the torch backend is one of the things it checks).

For pairs p with chosen row c_p and rejected row r_p of hidden H [N, D], value head w [D] and bias b:

    rc_p = H[c_p]·w + b,   rr_p = H[r_p]·w + b,   d_p = rc_p − rr_p − m_p
    ℓ_p = softplus(−d_p) = log(1 + exp(−d_p))
    loss = mean_p ℓ_p + κ·mean_p (rc_p + rr_p)²       (reduction "mean")
         = sum_p ℓ_p  + κ·mean_p (rc_p + rr_p)²       ("sum")
    loss_p = ℓ_p + κ·(rc_p + rr_p)²                   ("none", one per pair)

∂ℓ_p/∂rc_p = −σ(−d_p) = −∂ℓ_p/∂rr_p, and ∂(rc_p + rr_p)²/∂rc_p = 2(rc_p + rr_p).

Davidson (given log ν, ties t_p): with S_p = e^{d_p/2} + e^{−d_p/2} + ν, ℓ_p = log S_p − d_p/2 (a win) or
log S_p − log ν (a tie); ∂ℓ_p/∂d_p = ½(e^{d_p/2} − e^{−d_p/2})/S_p − ½[win], ∂ℓ_p/∂log ν = ν/S_p − [tie]."""

import numpy as np


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def pair_loss(hidden, weight, chosen, rejected, bias=None, margin=None, center_coef=0.0, reduction="mean",
              grad_loss=None, grad_chosen=None, grad_rejected=None, log_nu=None, tie=None):
    """Loss, rewards and, given the upstream gradients of the three outputs, the gradients of hidden, weight
    and bias (and log ν), all as float64 numpy arrays in a dict (keys: loss, chosen, rejected, d_hidden,
    d_weight, d_bias, d_log_nu). hidden [N, D] (or [..., D]); indices [P]; margin None, a float or [P];
    log_nu None (Bradley–Terry) or Davidson's log ν; tie None or [P] bool."""
    h = np.asarray(hidden, np.float64)
    shape = h.shape
    h = h.reshape(-1, shape[-1])
    w = np.asarray(weight, np.float64).reshape(-1)
    c, r = np.asarray(chosen, np.int64), np.asarray(rejected, np.int64)
    P = c.shape[0]
    b = 0.0 if bias is None else float(np.asarray(bias, np.float64))
    m = np.zeros(P) if margin is None else np.broadcast_to(np.asarray(margin, np.float64), (P,))
    rc, rr = h[c] @ w + b, h[r] @ w + b
    d = rc - rr - m
    if log_nu is None:
        ell = _softplus(-d)
        dell = -_sigmoid(-d)  # ∂ℓ/∂rc; ∂ℓ/∂rr is its negative
    else:
        t = np.zeros(P, bool) if tie is None else np.asarray(tie, bool)
        big = np.maximum(np.abs(d) / 2, float(log_nu))  # S = e^big · (…), kept finite
        S_scaled = np.exp(d / 2 - big) + np.exp(-d / 2 - big) + np.exp(float(log_nu) - big)
        log_S = big + np.log(S_scaled)
        ell = log_S - np.where(t, float(log_nu), d / 2)
        dell = 0.5 * (np.exp(d / 2 - big) - np.exp(-d / 2 - big)) / S_scaled - np.where(t, 0.0, 0.5)
        dnu = np.exp(float(log_nu) - big) / S_scaled - t
    s = rc + rr
    if reduction == "none":
        loss = ell + center_coef * s * s
    else:
        loss = (ell.mean() if reduction == "mean" else ell.sum()) + center_coef * (s * s).mean()
    out = {"loss": np.asarray(loss), "chosen": rc, "rejected": rr}
    if grad_loss is None:
        return out
    gl = np.asarray(grad_loss, np.float64)
    if reduction == "none":
        scale, center = gl, gl * center_coef * 2 * s
    else:
        scale = gl * (1.0 / P if reduction == "mean" else 1.0)
        center = gl * center_coef * 2 * s / P
    g_rc = scale * dell + center + np.asarray(grad_chosen, np.float64)
    g_rr = -scale * dell + center + np.asarray(grad_rejected, np.float64)
    d_hidden = np.zeros_like(h)
    np.add.at(d_hidden, c, g_rc[:, None] * w)
    np.add.at(d_hidden, r, g_rr[:, None] * w)
    out["d_hidden"] = d_hidden.reshape(shape)
    out["d_weight"] = g_rc @ h[c] + g_rr @ h[r]
    out["d_bias"] = np.asarray(g_rc.sum() + g_rr.sum())
    if log_nu is not None:
        out["d_log_nu"] = np.asarray((scale * dnu).sum())
    return out


def group_loss(rewards, better, worse, comparison_group, group_weight, weighting="comparison", score_diff=None,
               margin_scale=0.0, center_coef=0.0):
    """The loss of K-response groups from each response's reward: every comparison (better, worse) a pair,
    its per-pair loss ("none" above, margin margin_scale·score_diff) weighted by its group's weight,
    divided by the group's number of comparisons with weighting "group"; the weighted sum is divided by
    the number of comparisons (of groups with weighting "group")."""
    r = np.asarray(rewards, np.float64)
    rb, rw = r[np.asarray(better)], r[np.asarray(worse)]
    m = margin_scale * np.asarray(score_diff, np.float64) if margin_scale else 0.0
    per = _softplus(-(rb - rw - m)) + center_coef * (rb + rw) ** 2
    g = np.asarray(comparison_group)
    w = np.asarray(group_weight, np.float64)[g]
    if weighting == "group":
        w = w / np.bincount(g, minlength=len(group_weight))[g]
    return float((per * w).sum() / (len(group_weight) if weighting == "group" else len(per)))

"""Forecast metrics on numpy or CuPy arrays (B batch, P prognostic channels, H x W grid).

    sq_sum[v] = sum_{b, h, w} lat_w[h] * (y - target)[b, v, h, w]^2        (weighted_sq_sum)
    RMSE[v]   = sqrt(sq_sum[v] / (B * H * W))                              (weighted_rmse)
    denormalise(y) = y * std[v] + mean[v]      (the inverse of the data normalisation)

lat_w[h] = cos(lat_h) / mean(cos(lat)) has mean 1, so the RMSE is an area-weighted RMSE.
`weighted_sq_sum` is the per-rank partial sum a partitioned run adds up across ranks (the trainer
does the collective) before taking sqrt(total / (B * H * W)). Accumulation is float64.
"""
from __future__ import annotations

from weathermixer.autograd.xp import get_array_module


def _check(y, target, lat_w):
    """Shapes: y, target [B, P, H, W]; lat_w [H]."""
    if y.shape != target.shape or y.ndim != 4:
        raise ValueError(f"y {y.shape} and target {target.shape} must be equal 4-D [B, P, H, W]")
    if tuple(lat_w.shape) != (y.shape[2],):
        raise ValueError(f"lat_w has shape {tuple(lat_w.shape)}, expected ({y.shape[2]},)")


def weighted_sq_sum(y, target, lat_w):
    """float64 [P]: sum over b, h, w of lat_w[h] * (y - target)^2."""
    xp = get_array_module(y, target)
    lat_w = xp.asarray(lat_w, dtype=xp.float64)  # [H]
    _check(y, target, lat_w)
    d2 = (y.astype(xp.float64) - target.astype(xp.float64)) ** 2  # [B, P, H, W]
    return (d2 * lat_w[None, None, :, None]).sum(axis=(0, 2, 3))  # [P]


def weighted_rmse(y, target, lat_w):
    """float32 [P]: latitude-weighted RMSE per channel over batch and pixels."""
    xp = get_array_module(y, target)
    b, _, h, w = y.shape
    return xp.sqrt(weighted_sq_sum(y, target, lat_w) / (b * h * w)).astype(xp.float32)  # [P]


def denormalise(y, mean, std):
    """y * std + mean per channel; y [..., P, H, W], mean and std [P]; y's dtype."""
    xp = get_array_module(y)
    mean = xp.asarray(mean, dtype=y.dtype)  # [P]
    std = xp.asarray(std, dtype=y.dtype)  # [P]
    if mean.shape != (y.shape[-3],) or std.shape != (y.shape[-3],):
        raise ValueError(f"mean {mean.shape} and std {std.shape} must be ({y.shape[-3]},) for y {y.shape}")
    return y * std[:, None, None] + mean[:, None, None]  # [..., P, H, W]

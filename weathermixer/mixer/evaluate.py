"""Forecast skill of a model: latitude-weighted RMSE per prognostic variable, in physical units.

    RMSE_v = std_v * sqrt( sum_{s, h, w} lat_w[h] (y - target)^2[s, v, h, w] / (S H W) )

over S samples (t, t + lead): y is the model's forecast with latent rollout `lead`, target the
data at t + lead; the same for persistence (y = the input state at t), the baseline every
forecast must beat. Each rank adds up its own variables and rows; the sums meet over `model`
(every (variable, band) block is held by one rank of a group) and over `data` (the replicas
take turns over the samples), so the figures are the same for every layout.
"""
from __future__ import annotations

import numpy as np

from weathermixer.autograd.xp import to_host
from weathermixer.io.metrics import weighted_sq_sum
from weathermixer.jigsaw import ops
from weathermixer.mixer.api import predict
from weathermixer.mixer.train import read_batch


def evaluate(params, cfg, layout, source, lead: int = 1, max_samples: int | None = None,
             batch: int = 1) -> dict:
    """{"variables", "rmse", "persistence_rmse", "samples"}: RMSE per prognostic variable."""
    grid = layout.grid
    samples = source.samples(max_lead=lead)[:max_samples]
    mine = samples[grid.replica::grid.n_dp]
    channels = layout.prognostic_channels
    lat_w = source.lat_weights()[layout.lat_rows]  # [h]
    sums = np.zeros((2, cfg.n_prognostic))  # [model | persistence, P]
    for b in range(0, len(mine), batch):  # predict talks within the model group only
        x, target = read_batch(source, mine[b:b + batch], lead, layout)
        y = predict(params, x, cfg, rollout=lead, layout=layout)
        sums[0, channels] += to_host(weighted_sq_sum(y, target, lat_w))
        sums[1, channels] += weighted_sq_sum(x[:, :len(channels)], target, lat_w)
    sums = ops.allreduce_sum(ops.allreduce_sum(sums, grid.model, tag="evaluate"), grid.data,
                             tag="evaluate")
    std = source.std[:cfg.n_prognostic]
    scale = len(samples) * cfg.n_lat * cfg.n_lon
    rmse = np.sqrt(sums / scale) * std  # [2, P], physical units
    return {"variables": list(source.channels[:cfg.n_prognostic]), "rmse": rmse[0].tolist(),
            "persistence_rmse": rmse[1].tolist(), "samples": int(len(samples)), "lead": lead}

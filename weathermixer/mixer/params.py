"""Initialisation of SPEC.md: the same global arrays for a seed, whatever the layout.

Every weight and bias is U(-1/sqrt(fan_in), +1/sqrt(fan_in)), fan_in = the weight's second
dimension; LayerNorm scales are 1 and biases 0. Each parameter draws from its own generator,
seeded by (seed, crc32(name)), in float64, so a parameter does not depend on the others, on
the dtype asked for or on the layout: a rank draws the global array of one parameter, keeps
its block and frees the rest before drawing the next.
"""
from __future__ import annotations

import zlib

import numpy as np

from weathermixer.autograd.xp import to_module
from weathermixer.config import Config
from weathermixer.config import param_shapes


def _fan_in(name: str, shapes: dict) -> int:
    weight = name.rsplit("/", 1)[0] + "/weight"
    return shapes[weight][1]


def init_global(name: str, shapes: dict, seed: int) -> np.ndarray:
    """The float64 global array of parameter `name` for `seed`."""
    shape = shapes[name]
    if "norm/" in name:
        return np.ones(shape) if name.endswith("/scale") else np.zeros(shape)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    bound = 1.0 / np.sqrt(_fan_in(name, shapes))
    return rng.uniform(-bound, bound, size=shape)


def init_params(cfg: Config, seed: int = 0, dtype="float64", layout=None, xp=np) -> dict:
    """dict name -> array: global arrays, or this rank's blocks when `layout` is given."""
    shapes = param_shapes(cfg)
    params = {}
    for name in shapes:
        full = init_global(name, shapes, seed)
        block = full if layout is None else layout.shard(name, full)
        params[name] = to_module(np.ascontiguousarray(block, dtype=dtype), xp)
    return params

"""The model configuration of SPEC.md: the sizes that define one WeatherMixer.

Symbols (SPEC.md): P prognostic variables, S static ones, H x W grid, pl x pw patch,
T = (H / pl) * (W / pw) tokens, K = (P + S) * pl * pw patch length, E embed_dim,
Mt token_hidden_dim, Mc channel_hidden_dim, N n_blocks.

This module sits below every other one (it imports nothing of the package), so that
`io`, `jigsaw` and `mixer` can all take a `Config` without importing each other.
"""
from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class Config:
    n_lat: int
    n_lon: int
    n_prognostic: int
    n_static: int
    patch_lat: int
    patch_lon: int
    embed_dim: int
    token_hidden_dim: int
    channel_hidden_dim: int
    n_blocks: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Config.{field.name} must be an int, got {value!r}")
            smallest = 0 if field.name == "n_static" else 1
            if value < smallest:
                raise ValueError(f"Config.{field.name} must be >= {smallest}, got {value}")
        if self.n_lat % self.patch_lat:
            raise ValueError(f"n_lat={self.n_lat} is not divisible by patch_lat={self.patch_lat}")
        if self.n_lon % self.patch_lon:
            raise ValueError(f"n_lon={self.n_lon} is not divisible by patch_lon={self.patch_lon}")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def n_vars(self) -> int:
        """P + S: input channels."""
        return self.n_prognostic + self.n_static

    @property
    def patch_rows(self) -> int:
        """H / pl: token rows (latitude bands of patches)."""
        return self.n_lat // self.patch_lat

    @property
    def patch_cols(self) -> int:
        """W / pw: tokens per token row."""
        return self.n_lon // self.patch_lon

    @property
    def n_tokens(self) -> int:
        """T."""
        return self.patch_rows * self.patch_cols

    @property
    def patch_pixels(self) -> int:
        """pl * pw."""
        return self.patch_lat * self.patch_lon

    @property
    def patch_dim(self) -> int:
        """K = (P + S) * pl * pw."""
        return self.n_vars * self.patch_pixels

    @property
    def recovery_dim(self) -> int:
        """P * pl * pw: the decoder's output per token."""
        return self.n_prognostic * self.patch_pixels

    def n_params(self) -> int:
        """Parameter count of SPEC.md (JIGSAW.md section 11)."""
        E, T, Mt, Mc, P = (self.embed_dim, self.n_tokens, self.token_hidden_dim,
                           self.channel_hidden_dim, self.n_prognostic)
        block = 2 * T * Mt + Mt + T + 2 * E * Mc + Mc + 5 * E
        return ((self.patch_dim + 1) * E + self.n_blocks * block + 2 * E
                + (2 * E + 1) * self.recovery_dim + 2 * P + 4 * P + (2 * P * P + P))

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Config fields: {sorted(unknown)}")
        missing = names - set(d)
        if missing:
            raise ValueError(f"missing Config fields: {sorted(missing)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))


def param_shapes(cfg: Config) -> dict:
    """Global shape of every parameter, in SPEC.md order."""
    E, T, Mt, Mc, P = (cfg.embed_dim, cfg.n_tokens, cfg.token_hidden_dim,
                       cfg.channel_hidden_dim, cfg.n_prognostic)
    shapes = {"encoder/weight": (E, cfg.patch_dim), "encoder/bias": (E,)}
    for n in range(cfg.n_blocks):
        b = f"blocks/{n}/"
        shapes.update({
            b + "token_norm/scale": (E,), b + "token_norm/bias": (E,),
            b + "token_mixing/fc1/weight": (Mt, T), b + "token_mixing/fc1/bias": (Mt,),
            b + "token_mixing/fc2/weight": (T, Mt), b + "token_mixing/fc2/bias": (T,),
            b + "channel_norm/scale": (E,), b + "channel_norm/bias": (E,),
            b + "channel_mixing/fc1/weight": (Mc, E), b + "channel_mixing/fc1/bias": (Mc,),
            b + "channel_mixing/fc2/weight": (E, Mc), b + "channel_mixing/fc2/bias": (E,),
        })
    shapes.update({
        "decoder/norm/scale": (E,), "decoder/norm/bias": (E,),
        "decoder/recovery/weight": (cfg.recovery_dim, 2 * E),
        "decoder/recovery/bias": (cfg.recovery_dim,),
        "head/decoded_norm/scale": (P,), "head/decoded_norm/bias": (P,),
        "head/norm/scale": (2 * P,), "head/norm/bias": (2 * P,),
        "head/linear/weight": (P, 2 * P), "head/linear/bias": (P,),
    })
    return shapes

"""Who holds which block: the per-layer mapping of JIGSAW.md section 4 for a Pd x Pc grid.

`Layout(cfg, grid)` derives, once, every partition of every axis and the `ShardSpec` of every
parameter; the model reads its sizes and the kernels' partitions from here. With a 1 x 1 grid
every part is the whole axis and the same code is the serial model.

Axes and their cuts (i = domain coordinate, j = channel coordinate):

    tokens T_i       bands of patch rows over `domain` (contiguous token ranges)
    rows_i           the latitude rows of band i (pixels, for the head and the data reads)
    E_j, Mc_j, Mt_j  split_sizes over `channel`; E_i, Mc_i, Mt_i over `domain` (weight rows)
    V_j, S_j         prognostic and static variables over `channel`
    K_j              (V_j, then S_j) x pl x pw: the patch axis, variable slowest
    2E_j, 2P_j       E_j u (E + E_j) and V_j u (P + V_j): the decoder and head concats

    layer                  frame        weight block               output block
    encoder                standard     [E_i, K_j]                 Z0 [T_i, E_j]
    token_mixing/fc1       transposed   [Mt_j, T_i]                H1^T [E_j, Mt_i]
    token_mixing/fc2       transposed   [T_j, Mt_i]                O^T [E_j, T_i]
    channel_mixing/fc1     standard     [Mc_i, E_j]                G [T_i, Mc_j]
    channel_mixing/fc2     standard     [E_i, Mc_j]                [T_i, E_j]
    decoder/recovery       standard     [V_i pl pw, 2E_j]          R [T_i, V_j pl pw]
    head/linear            standard     [V_i, 2P_j]  (pixels)      y [V_j, rows_i, W]

A bias is cut like its layer's output columns and replicated over the other group; LN
scales and biases are cut like E_j (or V_j, 2P_j) and replicated over `domain`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from weathermixer.config import Config, param_shapes
from weathermixer.jigsaw.matmul import STANDARD, TRANSPOSED, Frame
from weathermixer.jigsaw.shard import Partition, ShardSpec, Split, take


@dataclasses.dataclass(frozen=True)
class Dense:
    """One distributed linear layer: its frame and the cuts of its weight rows and outputs."""
    frame: Frame
    w_rows: Partition
    out_cols: Partition


class LayoutError(ValueError):
    """The model cannot be cut over the requested grid (an empty part somewhere)."""


def check_splittable(cfg: Config, pd: int, pc: int) -> None:
    """LayoutError unless every cut axis of `cfg` has a part for every rank of a pd x pc grid
    (run on every rank before any collective, so all ranks fail alike)."""
    needs = [("token rows n_lat/patch_lat", cfg.patch_rows, pd),
             ("prognostic variables", cfg.n_prognostic, max(pd, pc)),
             ("embed_dim", cfg.embed_dim, max(pd, pc)),
             ("token_hidden_dim", cfg.token_hidden_dim, max(pd, pc)),
             ("channel_hidden_dim", cfg.channel_hidden_dim, max(pd, pc)),
             ("tokens", cfg.n_tokens, pc)]
    for what, n, parts in needs:
        if n < parts:
            raise LayoutError(f"cannot split {what} = {n} into {parts} parts on a "
                              f"{pd}x{pc} grid: some rank would hold nothing")


class Layout:
    """Every partition and shard spec of `cfg` on `grid` (see the module docstring)."""

    def __init__(self, cfg: Config, grid):
        self.cfg, self.grid = cfg, grid
        pd, pc = grid.pd, grid.pc
        check_splittable(cfg, pd, pc)
        E, Mt, Mc, P, S = (cfg.embed_dim, cfg.token_hidden_dim, cfg.channel_hidden_dim,
                           cfg.n_prognostic, cfg.n_static)
        pix = cfg.patch_pixels
        bands = Partition.even(cfg.patch_rows, pd)  # patch rows of each domain part
        self.tokens = Partition.blocks(bands, cfg.patch_cols)  # T_i
        self.rows = Partition.blocks(bands, cfg.patch_lat)  # latitude rows of band i
        self.E_c, self.E_d = Partition.even(E, pc), Partition.even(E, pd)
        self.Mt_c, self.Mt_d = Partition.even(Mt, pc), Partition.even(Mt, pd)
        self.Mc_c, self.Mc_d = Partition.even(Mc, pc), Partition.even(Mc, pd)
        self.T_c = Partition.even(cfg.n_tokens, pc)
        self.V_c, self.V_d = Partition.even(P, pc), Partition.even(P, pd)
        self.S_c = Partition.even(S, pc)
        self.K_c = Partition.blocks(Partition.concat(self.V_c, self.S_c), pix)
        self.E2_c = Partition.concat(self.E_c, self.E_c)
        self.P2_c = Partition.concat(self.V_c, self.V_c)
        self.dense = {
            "encoder": Dense(STANDARD, self.E_d, self.E_c),
            "token_mixing/fc1": Dense(TRANSPOSED, self.Mt_c, self.Mt_d),
            "token_mixing/fc2": Dense(TRANSPOSED, self.T_c, self.tokens),
            "channel_mixing/fc1": Dense(STANDARD, self.Mc_d, self.Mc_c),
            "channel_mixing/fc2": Dense(STANDARD, self.E_d, self.E_c),
            "decoder/recovery": Dense(STANDARD, Partition.blocks(self.V_d, pix),
                                      Partition.blocks(self.V_c, pix)),
            "head/linear": Dense(STANDARD, self.V_d, self.V_c),
        }
        self.specs = self._param_specs()
        self._data_parts = {name: Partition.even(int(np.prod(spec.block_shape(self.coords),
                                                             dtype=np.int64)), grid.data.size)
                            for name, spec in self.specs.items()}

    # ---- shard specs -------------------------------------------------------------------
    def _param_specs(self) -> dict:
        d, c = "domain", "channel"
        shapes = param_shapes(self.cfg)

        def vec(part, over, replicated):
            return (Split(part, over),), replicated

        def mat(rows, rows_over, cols, cols_over):
            return (Split(rows, rows_over), Split(cols, cols_over)), None

        rules = {
            "encoder/weight": mat(self.E_d, d, self.K_c, c),
            "encoder/bias": vec(self.E_c, c, d),
            "token_norm/scale": vec(self.E_c, c, d), "token_norm/bias": vec(self.E_c, c, d),
            "token_mixing/fc1/weight": mat(self.Mt_c, c, self.tokens, d),
            "token_mixing/fc1/bias": vec(self.Mt_d, d, c),
            "token_mixing/fc2/weight": mat(self.T_c, c, self.Mt_d, d),
            "token_mixing/fc2/bias": vec(self.tokens, d, c),
            "channel_norm/scale": vec(self.E_c, c, d), "channel_norm/bias": vec(self.E_c, c, d),
            "channel_mixing/fc1/weight": mat(self.Mc_d, d, self.E_c, c),
            "channel_mixing/fc1/bias": vec(self.Mc_c, c, d),
            "channel_mixing/fc2/weight": mat(self.E_d, d, self.Mc_c, c),
            "channel_mixing/fc2/bias": vec(self.E_c, c, d),
            "decoder/norm/scale": vec(self.E_c, c, d), "decoder/norm/bias": vec(self.E_c, c, d),
            "decoder/recovery/weight": mat(self.dense["decoder/recovery"].w_rows, d, self.E2_c, c),
            "decoder/recovery/bias": vec(self.dense["decoder/recovery"].out_cols, c, d),
            "head/decoded_norm/scale": vec(self.V_c, c, d),
            "head/decoded_norm/bias": vec(self.V_c, c, d),
            "head/norm/scale": vec(self.P2_c, c, d), "head/norm/bias": vec(self.P2_c, c, d),
            "head/linear/weight": mat(self.V_d, d, self.P2_c, c),
            "head/linear/bias": vec(self.V_c, c, d),
        }
        specs = {}
        for name, shape in shapes.items():
            key = name.split("/", 2)[2] if name.startswith("blocks/") else name
            splits, replicated = rules[key]
            specs[name] = ShardSpec(shape, splits, replicated)
        return specs

    # ---- this rank's parts -------------------------------------------------------------
    @property
    def coords(self) -> dict:
        return self.grid.coords

    def part(self, partition: Partition, group: str):
        return partition.index(self.coords[group])

    @property
    def input_channels(self) -> np.ndarray:
        """Indices into the P + S input channels held by this rank: V_j, then S_j."""
        v = self.V_c.indices(self.part(self.V_c, "channel"))
        s = self.S_c.indices(self.part(self.S_c, "channel")) + self.cfg.n_prognostic
        return np.concatenate([v, s])

    @property
    def prognostic_channels(self) -> np.ndarray:
        """Indices of the prognostic variables V_j (this rank's output channels)."""
        return self.V_c.indices(self.part(self.V_c, "channel"))

    @property
    def lat_rows(self) -> slice:
        """The latitude rows of this rank's band."""
        return self.part(self.rows, "domain")

    @property
    def n_lat_local(self) -> int:
        return self.rows.size(self.coords["domain"])

    def data_parts(self, name: str) -> Partition:
        """The cut of this rank's block of parameter `name`, flattened (row-major), into one
        contiguous part per replica (member of `data`): the part that replica's optimizer
        updates (`mixer.optim`), then gathers to the others."""
        return self._data_parts[name]

    def data_part(self, name: str) -> slice:
        """This replica's part of `data_parts(name)`."""
        return self.data_parts(name).index(self.grid.data.rank)

    def shard(self, name: str, global_array):
        """This rank's block of a global parameter (or of its gradient / optimizer state)."""
        return take(global_array, self.specs[name].index(self.coords))

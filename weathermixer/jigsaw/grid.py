"""The process grid: model groups of Q = Pd x Pc ranks, replicated n_dp times.

World rank g = rep * Q + q, and rank q of a model group sits at (i, j) = divmod(q, Pc):
i is its domain part (a band of token rows, or of latitude rows for pixels), j its channel
part. Q in {1, 2, 4} gives the layouts of the paper (1x1, 1x2, 2x2); any Pd x Pc works.

    world rank    0   1   2   3 | 4   5   6   7      (Pd x Pc = 2 x 2, n_dp = 2)
    (i, j)       00  01  10  11 |00  01  10  11
    channel      {0,1} {2,3}    |{4,5} {6,7}          same replica, same i: splits E, P, Mc
    domain       {0,2} {1,3}    |{4,6} {5,7}          same replica, same j: splits T, rows
    model        {0,1,2,3}      |{4,5,6,7}            one replica: loss, gradient norm
    data         {0,4} {1,5} {2,6} {3,7}              same (i, j): gradient mean

With one rank every group is a `LocalGroup` and every collective is the identity.
"""
from __future__ import annotations

import dataclasses

from weathermixer.jigsaw.backend import LocalGroup, MPIGroup, NCCLGroup

LAYOUTS = {1: (1, 1), 2: (1, 2), 4: (2, 2)}


def parse_grid(text: str) -> tuple[int, int]:
    """'2x2' -> (2, 2): domain parts x channel parts."""
    try:
        pd, pc = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"grid {text!r} is not of the form DxC, e.g. 2x2 or 2x1") from None
    if pd < 1 or pc < 1:
        raise ValueError(f"grid {text!r} needs positive sizes")
    return pd, pc


@dataclasses.dataclass
class ProcessGrid:
    """Named groups of one rank: `model`, `channel`, `domain`, `data`, and `world`."""
    pd: int
    pc: int
    n_dp: int
    i: int
    j: int
    replica: int
    world: object
    model: object
    channel: object
    domain: object
    data: object

    @property
    def q(self) -> int:
        """Rank within the model group."""
        return self.i * self.pc + self.j

    @property
    def model_size(self) -> int:
        return self.pd * self.pc

    @property
    def coords(self) -> dict:
        """Coordinates by group name, as `ShardSpec.index` wants them."""
        return {"domain": self.i, "channel": self.j}

    def group(self, name: str):
        return getattr(self, name)

    @property
    def is_root(self) -> bool:
        return self.world.rank == 0

    def describe(self) -> str:
        return (f"{self.world.size} ranks = {self.n_dp} replica(s) x {self.pd}x{self.pc} "
                f"(domain x channel) model group")

    @classmethod
    def serial(cls) -> "ProcessGrid":
        g = LocalGroup
        return cls(1, 1, 1, 0, 0, 0, g("world"), g("model"), g("channel"), g("domain"), g("data"))

    @classmethod
    def from_mpi(cls, pd: int, pc: int, comm=None, backend: str = "mpi") -> "ProcessGrid":
        """Split `comm` (default MPI.COMM_WORLD) into replicas of a pd x pc model group.

        backend "mpi": MPI buffers (CuPy arrays staged through the host unless MPI reports
        CUDA support: `backend.mpi_cuda_aware`); "nccl": CuPy arrays over NCCL (one GPU per
        rank, the device already chosen), host arrays over MPI.
        Raises ValueError (on every rank alike) when the world size is not a multiple of pd*pc.
        """
        from mpi4py import MPI
        comm = MPI.COMM_WORLD if comm is None else comm
        n, q_size = comm.Get_size(), pd * pc
        if n % q_size:
            raise ValueError(f"world size {n} is not divisible by the model group size "
                             f"{q_size} ({pd}x{pc}); launch a multiple of {q_size} ranks")
        if n == 1:
            return cls.serial()
        g = comm.Get_rank()
        replica, q = divmod(g, q_size)
        i, j = divmod(q, pc)
        group = {"mpi": MPIGroup, "nccl": NCCLGroup}[backend]
        split = lambda color, name: group(comm.Split(color, g), name)  # noqa: E731
        return cls(pd, pc, n // q_size, i, j, replica,
                   world=group(comm, "world"),
                   model=split(replica, "model"),
                   channel=split(replica * pd + i, "channel"),
                   domain=split(replica * pc + j, "domain"),
                   data=split(q, "data"))


def node_placement(comm=None) -> tuple[int, int]:
    """(rank among the ranks of this node, ranks on this node), from MPI's shared-memory split."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD if comm is None else comm
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()

"""`mpi_cuda_aware()`: device arrays go to MPI only where the MPI library reports CUDA device
memory among its memory allocation kinds. The library's answer is replaced here by a stand-in,
so every case runs on any machine; tests/mpi/test_backend_mpi.py asks the real MPI."""
import pytest

from weathermixer.jigsaw import backend


@pytest.fixture(autouse=True)
def fresh_answer(monkeypatch):
    """No cached answer before or after a test, and no override from the caller's shell."""
    monkeypatch.delenv(backend.CUDA_AWARE_ENV, raising=False)
    backend.mpi_cuda_aware.cache_clear()
    yield
    backend.mpi_cuda_aware.cache_clear()


def reports(monkeypatch, kinds):
    monkeypatch.setattr(backend, "_memory_alloc_kinds", lambda: kinds)


@pytest.mark.parametrize("kinds,expected", [
    ("mpi,system", False),                      # MPICH without GPU support
    (None, False),                              # the key unset: an MPI before 4.1
    ("mpi,system,cuda:device", True),
    ("mpi,system,cuda:device,cuda:managed,cuda", True),
    ("mpi,system,cuda", True),                  # no restrictor: every CUDA allocation
    ("mpi,system,cuda:host,cuda:managed", False),  # not cudaMalloc memory, which CuPy uses
    ("mpi,system,rocm:device", False),
])
def test_cuda_aware_only_where_mpi_reports_cuda_device_memory(monkeypatch, kinds, expected):
    reports(monkeypatch, kinds)
    assert backend.mpi_cuda_aware() is expected


def test_a_failing_query_means_staging(monkeypatch):
    def fail():
        raise RuntimeError("MPI_Comm_get_info failed")
    monkeypatch.setattr(backend, "_memory_alloc_kinds", fail)
    assert backend.mpi_cuda_aware() is False


def test_zero_in_the_environment_turns_a_reported_cuda_support_off(monkeypatch):
    reports(monkeypatch, "mpi,system,cuda:device")
    monkeypatch.setenv(backend.CUDA_AWARE_ENV, "0")
    assert backend.mpi_cuda_aware() is False


def test_one_in_the_environment_cannot_turn_it_on_where_mpi_does_not_report_it(monkeypatch):
    reports(monkeypatch, "mpi,system")
    monkeypatch.setenv(backend.CUDA_AWARE_ENV, "1")
    assert backend.mpi_cuda_aware() is False


def test_the_answer_is_cached(monkeypatch):
    reports(monkeypatch, "mpi,system,cuda:device")
    assert backend.mpi_cuda_aware() is True
    reports(monkeypatch, "mpi,system")
    assert backend.mpi_cuda_aware() is True

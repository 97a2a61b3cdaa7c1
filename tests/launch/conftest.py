"""Fixtures of the launch tests: real SLURM clusters on loopback (stopped at the end even when a
test fails) and a small indexed dataset of real text (Python standard library sources)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.launch.slurm_cluster import SlurmCluster, ensure_installed

# About 60k tokens of stdlib sources: enough distinct windows that 40 steps never repeat data.
DATA_BYTES = 200_000


@pytest.fixture(scope="session")
def slurm_ready() -> None:
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def single_node_cluster(slurm_ready) -> Iterator[SlurmCluster]:
    """One slurmd registered under this host's name, as on a real compute node."""
    with SlurmCluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def two_node_cluster(slurm_ready) -> Iterator[SlurmCluster]:
    """Two slurmd (`-N n1`, `-N n2`) on this host: a two-node allocation whose names do not resolve."""
    with SlurmCluster(nodes=["n1", "n2"]) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory) -> str:
    """Prefix of an indexed dataset (CodeGen tokens) written by data_prep from stdlib sources."""
    from data_prep import prepare_text_files, stdlib_sources

    prefix = tmp_path_factory.mktemp("launch_data") / "stdlib"
    prepare_text_files(stdlib_sources(DATA_BYTES), prefix)
    return str(prefix)

"""One private PostgreSQL cluster for the tests that stop and start PostgreSQL.

initdb is the slow part (seconds), so the cluster is shared by the session; every test makes
its own database in it and finds it running (a test that failed mid-outage may have left it
stopped).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.support import PrivateCluster


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivateCluster]:
    cluster = PrivateCluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_cluster(private_pg: PrivateCluster) -> PrivateCluster:
    private_pg.ensure_running()
    return private_pg

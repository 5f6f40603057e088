"""Conformance, one way: the tests of batchkit's own KServe v2 server, run against a real Triton.

They were written against batchkit's server (tests/asgi/test_server.py); here the same test
functions run with ``server`` and ``client`` pointing at Triton serving models of the same
names and signatures (tests/triton_server.py), so they check the protocol, not our reading of
it. The other way, a TritonModel calling batchkit's server, is in tests/integrations/test_triton.py.

Left out, because they test batchkit's own policies rather than the protocol: batches formed
across clients and the metrics (batchkit's statistics and metric names), the safe message of a
model failure (Triton returns the model's message), the bounded queue per row (Triton bounds
requests), the gated deadline (needs an in-process model), and the body limit (Triton's differs).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ..support.triton_server import TritonServer

pytest.importorskip("numpy")
tritonclient_http = pytest.importorskip("tritonclient.http")
pytest.importorskip("uvicorn")

from .test_server import (  # noqa: E402
    test_client_errors as test_client_errors,
)
from .test_server import (  # noqa: E402
    test_compression_both_ways as test_compression_both_ways,
)
from .test_server import (  # noqa: E402
    test_concurrent_sync_clients_each_get_their_own_result as test_concurrent_sync_clients_each_get_their_own_result,  # noqa: E501
)
from .test_server import (  # noqa: E402
    test_error_bodies_are_json_with_an_error_field as test_error_bodies_are_json_with_an_error_field,  # noqa: E501
)
from .test_server import (  # noqa: E402
    test_every_datatype_with_the_sync_client as test_every_datatype_with_the_sync_client,
)
from .test_server import (  # noqa: E402
    test_health_metadata_and_config as test_health_metadata_and_config,
)

pytestmark = pytest.mark.triton


@pytest.fixture
def flavor() -> str:
    return "triton"


@pytest.fixture
def server(triton_server: TritonServer) -> str:
    """Triton's HTTP endpoint, as ``host:port`` (what the batchkit server tests get)."""
    return triton_server.http_url.removeprefix("http://")


@pytest.fixture
def client(server: str) -> Iterator[Any]:
    c = tritonclient_http.InferenceServerClient(server, concurrency=8)
    yield c
    c.close()

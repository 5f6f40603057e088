"""Conformance over gRPC: the protocol tests of batchkit's gRPC server, run against a real Triton.

The same test functions as tests/asgi/test_grpc.py, with ``target`` and ``client`` pointing at
Triton's gRPC endpoint serving models of the same names and signatures
(tests/support/triton_server.py): the same answers, the same status codes.

Left out, because they test batchkit's own policies or extensions: typed outputs and FP16/BF16
as fp32_contents (Triton answers raw, and takes those two only raw), integer range checks of
typed contents (Triton truncates), the messages shared with HTTP, the model failure's safe
message, the bounded queue per row, deadlines and cancellation (need an in-process model), the
message size limit, statistics of an unknown model (Triton: INVALID_ARGUMENT, batchkit:
NOT_FOUND, as for every other unknown model) and the repository's admin token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ..support.triton_server import TritonServer

pytest.importorskip("numpy")
grpcclient = pytest.importorskip("tritonclient.grpc")
pytest.importorskip("grpc_health.v1.health_pb2")

from .test_grpc import (  # noqa: E402
    test_bad_protobuf_does_not_kill_the_server as test_bad_protobuf_does_not_kill_the_server,
)
from .test_grpc import (  # noqa: E402
    test_client_errors_have_tritons_codes as test_client_errors_have_tritons_codes,
)
from .test_grpc import (  # noqa: E402
    test_concurrent_requests_with_the_asyncio_client as test_concurrent_requests_with_the_asyncio_client,  # noqa: E501
)
from .test_grpc import (  # noqa: E402
    test_every_datatype_as_typed_contents_both_ways as test_every_datatype_as_typed_contents_both_ways,  # noqa: E501
)
from .test_grpc import (  # noqa: E402
    test_every_datatype_raw_with_the_sync_client as test_every_datatype_raw_with_the_sync_client,
)
from .test_grpc import (  # noqa: E402
    test_grpc_health_v1 as test_grpc_health_v1,
)
from .test_grpc import (  # noqa: E402
    test_stream_infer_answers_each_request_once as test_stream_infer_answers_each_request_once,
)

pytestmark = pytest.mark.triton


@pytest.fixture
def flavor() -> str:
    return "triton"


@pytest.fixture
def target(triton_server: TritonServer) -> str:
    """Triton's gRPC endpoint, as ``host:port`` (what the batchkit gRPC tests get)."""
    return triton_server.grpc_url.removeprefix("grpc://")


@pytest.fixture
def client(target: str) -> Iterator[Any]:
    c = grpcclient.InferenceServerClient(target)
    yield c
    c.close()

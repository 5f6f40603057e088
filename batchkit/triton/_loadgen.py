"""Load generation over KServe v2 (HTTP or gRPC): drive a server, measure each step
(``batchkit bench``, the pytest plugin's HTTP and gRPC targets).

Needs ``tritonclient[http]`` (and numpy), and ``tritonclient[grpc]`` for ``--protocol grpc``.
Two ways to load a server:

- closed loop: N workers, each sending its next request when the last one is answered;
- open loop: requests sent on a fixed schedule (a target rate), whether or not earlier ones
  were answered; latency counts from the scheduled send time, so a slow server cannot hide
  its queueing (no coordinated omission).

Every request ends as ok or as an error of one kind: ``reject`` (503, gRPC UNAVAILABLE: the
queue was full), ``timeout`` (504, 408, gRPC DEADLINE_EXCEEDED, or the client's own timeout)
or ``other``.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http.aio as aio
from tritonclient.utils import InferenceServerException

__all__ = (
    "ERROR_KINDS",
    "Step",
    "Target",
    "classify",
    "closed_loop",
    "load_inputs",
    "open_loop",
    "random_inputs",
    "client_module",
)

ERROR_KINDS = ("reject", "timeout", "other")
# Largest number of open-loop requests outstanding at once; later sends count as rejected by
# the client (it cannot keep up) rather than growing without bound.
MAX_OUTSTANDING = 10_000

_NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BF16": np.float32,  # tritonclient takes float32 data for BF16 and converts it
    "BYTES": np.object_,
}


@dataclass
class Step:
    """What one step of a run measured (times in seconds)."""

    model: str
    mode: str  # "closed" or "open"
    concurrency: int | None = None
    target_rate: float | None = None
    duration: float = 0.0
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    error_samples: dict[str, str] = field(default_factory=dict)
    throughput: float = 0.0  # ok requests per second
    achieved_rate: float = 0.0  # answered requests (ok or not) per second
    latency: dict[str, float] = field(default_factory=dict)  # p50, p90, p99, max, mean
    server_batch_size: float | None = None
    # A deployment of several versions (batchkit servers): items each version got during the
    # step (routed and pinned), and the shadow's comparisons by outcome; None otherwise.
    versions: dict[str, int] | None = None
    shadow: dict[str, int] | None = None

    @property
    def failed(self) -> int:
        """Return the requests that ended in an error."""
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        """Return the step as plain JSON data."""
        data = asdict(self)
        data["failed"] = self.failed
        return data


def client_module(protocol: str) -> Any:
    """Return tritonclient's asyncio module for ``protocol`` ("http" or "grpc")."""
    if protocol == "grpc":
        import tritonclient.grpc.aio as grpc_aio

        return grpc_aio
    return aio


def classify(exc: BaseException) -> str:
    """Return the error kind of a failed request: reject, timeout or other."""
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        if status in ("503", "StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED"):
            return "reject"
        if status in ("504", "408", "StatusCode.DEADLINE_EXCEEDED"):
            return "timeout"
        return "other"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    return "other"


def _summary(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    ordered = sorted(latencies)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))]

    return {
        "p50": rank(0.5),
        "p90": rank(0.9),
        "p99": rank(0.99),
        "max": ordered[-1],
        "mean": math.fsum(ordered) / n,
    }


class Target:
    """One model on one server: its inputs and outputs, and one inference request.

    ``protocol`` is "http" or "grpc" (``client`` is tritonclient's asyncio client of that
    protocol); ``metrics_url`` is the ``host:port`` serving batchkit's ``/metrics`` (default:
    ``url`` over HTTP, none over gRPC); ``https``: HTTP over TLS, for the requests and /metrics.
    """

    def __init__(
        self,
        client: Any,
        url: str,
        model: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        datatypes: Mapping[str, str],
        outputs: Sequence[str],
        *,
        binary: bool = True,
        timeout: float | None = None,
        protocol: str = "http",
        metrics_url: str | None = None,
        https: bool = False,
    ) -> None:
        self.client = client
        self.protocol = protocol
        self.https = https  # the HTTP server (and its /metrics) speaks TLS
        self._module = client_module(protocol)
        self.metrics_url = url if metrics_url is None and protocol == "http" else metrics_url
        self.url = url
        self.model = model
        self.version = version
        self.inputs = dict(inputs)
        self.datatypes = dict(datatypes)
        self.outputs = list(outputs)
        self.binary = binary
        self.timeout = timeout

    async def infer(self) -> None:
        """Send one request; raise on any error."""
        module, inputs = self._module, []
        for name, array in self.inputs.items():
            inp = module.InferInput(name, list(array.shape), self.datatypes[name])
            if self.protocol == "grpc":  # always raw contents
                inp.set_data_from_numpy(array)
            else:
                inp.set_data_from_numpy(array, binary_data=self.binary)
            inputs.append(inp)
        if self.protocol == "grpc":
            outputs = [module.InferRequestedOutput(n) for n in self.outputs]
        else:
            outputs = [
                module.InferRequestedOutput(n, binary_data=self.binary) for n in self.outputs
            ]
        call = self.client.infer(self.model, inputs, model_version=self.version, outputs=outputs)
        if self.timeout is None:
            await call
        else:
            await asyncio.wait_for(call, self.timeout)

    async def routing_counts(self) -> tuple[dict[str, int], dict[str, int]] | None:
        """Return, when the model is a deployment of several versions, the items each version
        got so far and the shadow's comparisons by outcome, from batchkit metrics; else None."""
        return await _routing_counts(self)

    async def batch_counts(self) -> tuple[float, float] | None:
        """Return the server's (items, batches) so far for this model, from batchkit metrics.

        None when the server exposes no batchkit metrics for it.
        """
        text = await _metrics_text(self)
        if text is None:
            return None
        label = re.escape(json.dumps(self.model))
        # One series per version serving (label "version"); without a version, all of them.
        version = r'"[^"]*"' if not self.version else re.escape(json.dumps(self.version))
        found = {}
        for key in ("sum", "count"):
            pattern = rf"^batchkit_batch_size_{key}\{{model={label},version={version}\}} (\S+)$"
            matches = re.findall(pattern, text, re.M)
            if not matches:
                return None
            found[key] = sum(float(m) for m in matches)
        return found["sum"], found["count"]


async def _metrics_text(target: Target) -> str | None:
    """Return the text of the server's ``/metrics`` at ``target.metrics_url`` (None: none)."""
    if target.metrics_url is None:
        return None
    try:
        if target.protocol == "grpc":
            return await asyncio.to_thread(_read_metrics, target.metrics_url)
        session = target.client._stub  # tritonclient's aiohttp session: same connections
        scheme = "https" if target.https else "http"
        async with session.get(f"{scheme}://{target.metrics_url}/metrics") as response:
            if response.status != 200:
                return None
            return str(await response.text())
    except Exception:
        return None


def _read_metrics(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return str(response.read().decode())


async def _routing_counts(target: Target) -> tuple[dict[str, int], dict[str, int]] | None:
    text = await _metrics_text(target)
    if text is None:
        return None
    routed: dict[str, int] = {}
    for labels, value in _series(text, "batchkit_routed_items_total"):
        if labels.get("model") == target.model:
            version = labels.get("version", "")
            routed[version] = routed.get(version, 0) + int(value)
    if not routed:
        return None
    shadow = {
        labels.get("outcome", ""): int(value)
        for labels, value in _series(text, "batchkit_shadow_items_total")
        if labels.get("model") == target.model
    }
    return routed, shadow


async def _batch_size_during(target: Target, run: Awaitable[Step]) -> Step:
    before = await target.batch_counts()
    routing_before = await target.routing_counts()
    step = await run
    after = await target.batch_counts()
    routing_after = await target.routing_counts()
    if before is not None and after is not None and after[1] > before[1]:
        step.server_batch_size = (after[0] - before[0]) / (after[1] - before[1])
    if routing_before is not None and routing_after is not None:
        step.versions = _delta(routing_before[0], routing_after[0])
        step.shadow = _delta(routing_before[1], routing_after[1])
    return step


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in sorted(after.items())}


def _series(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Return every sample of metric ``name`` in the exposition ``text``, with its labels."""
    found = []
    for match in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1)))
        found.append((labels, float(match.group(2))))
    return found


def _record(step: Step, exc: BaseException) -> None:
    kind = classify(exc)
    step.errors[kind] += 1
    step.error_samples.setdefault(kind, f"{type(exc).__name__}: {exc}"[:300])


async def closed_loop(
    target: Target,
    concurrency: int,
    *,
    duration: float | None,
    requests: int | None,
    warmup: float,
    progress: Callable[[float], None] | None = None,
) -> Step:
    """Run ``concurrency`` workers for ``duration`` seconds (or ``requests`` in all)."""
    if warmup > 0:
        await _closed(target, concurrency, warmup, None, None)
    run = _closed(target, concurrency, duration, requests, progress)
    return await _batch_size_during(target, run)


async def _closed(
    target: Target,
    concurrency: int,
    duration: float | None,
    requests: int | None,
    progress: Callable[[float], None] | None,
) -> Step:
    step = Step(target.model, "closed", concurrency=concurrency)
    latencies: list[float] = []
    clock = time.perf_counter
    start = clock()
    end = start + duration if duration is not None else math.inf
    budget = iter(range(requests)) if requests is not None else None

    def more() -> bool:
        if clock() >= end:
            return False
        return budget is None or next(budget, None) is not None

    async def worker() -> None:
        while more():
            step.sent += 1
            t0 = clock()
            try:
                await target.infer()
            except Exception as exc:
                _record(step, exc)
            else:
                latencies.append(clock() - t0)
                step.ok += 1
            if progress is not None:
                progress(_fraction(clock() - start, duration, step.sent, requests))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _finish(step, latencies, clock() - start)


async def open_loop(
    target: Target,
    rate: float,
    *,
    duration: float | None,
    requests: int | None,
    warmup: float,
    progress: Callable[[float], None] | None = None,
) -> Step:
    """Send requests at ``rate`` per second for ``duration`` seconds (or ``requests`` in all)."""
    if warmup > 0:
        await _open(target, rate, warmup, None, None)
    return await _batch_size_during(target, _open(target, rate, duration, requests, progress))


async def _open(
    target: Target,
    rate: float,
    duration: float | None,
    requests: int | None,
    progress: Callable[[float], None] | None,
) -> Step:
    step = Step(target.model, "open", target_rate=rate)
    latencies: list[float] = []
    clock = time.perf_counter
    total = requests if requests is not None else max(1, round(rate * (duration or 0.0)))
    pending: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        try:
            await target.infer()
        except Exception as exc:
            _record(step, exc)
        else:
            latencies.append(clock() - scheduled)
            step.ok += 1

    start = clock()
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        step.sent += 1
        if len(pending) >= MAX_OUTSTANDING:
            step.errors["reject"] += 1
            step.error_samples.setdefault("reject", "the client had too many requests open")
            continue
        task = asyncio.ensure_future(one(scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
        if progress is not None:
            progress(_fraction(clock() - start, duration, step.sent, requests))
    if pending:
        await asyncio.gather(*pending)
    return _finish(step, latencies, clock() - start)


def _fraction(elapsed: float, duration: float | None, sent: int, requests: int | None) -> float:
    if requests is not None:
        return min(1.0, sent / max(1, requests))
    return min(1.0, elapsed / duration) if duration else 1.0


def _finish(step: Step, latencies: list[float], elapsed: float) -> Step:
    step.duration = elapsed
    step.throughput = step.ok / elapsed if elapsed > 0 else 0.0
    step.achieved_rate = (step.ok + step.failed) / elapsed if elapsed > 0 else 0.0
    step.latency = _summary(latencies)
    return step


# -- inputs ------------------------------------------------------------------------------------


def random_inputs(
    metadata: Mapping[str, Any], *, batch: int = 1, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Return random input arrays (and their datatypes) shaped from the model's metadata.

    Variable dims (-1) become ``batch`` for the first and 1 for the others.
    """
    rng = np.random.default_rng(seed)
    arrays, datatypes = {}, {}
    for spec in metadata.get("inputs", []):
        name, datatype = spec["name"], spec["datatype"]
        dims = [int(d) for d in spec["shape"]]
        shape = [(batch if i == 0 else 1) if d < 0 else d for i, d in enumerate(dims)]
        arrays[name] = _random_array(rng, datatype, shape)
        datatypes[name] = datatype
    return arrays, datatypes


def _random_array(rng: np.random.Generator, datatype: str, shape: list[int]) -> np.ndarray:
    if datatype not in _NUMPY:
        raise ValueError(f"cannot generate data for datatype {datatype!r}")
    if datatype == "BYTES":
        # Letters: valid UTF-8, so the same data works as JSON tensors.
        letters = rng.integers(ord("a"), ord("z"), (int(np.prod(shape)), 8), endpoint=True)
        flat = [bytes(row.tolist()) for row in letters]
        return np.array(flat, dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        return rng.random(shape) < 0.5
    dtype: Any = np.dtype(_NUMPY[datatype])
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), shape, endpoint=True).astype(dtype)


def load_inputs(
    path: str | Path, metadata: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read inputs from ``.npz`` (arrays by input name) or ``.json`` (``{name: nested list}``
    or ``{name: {"data": [...], "shape": [...]}}``), typed by the model's metadata."""
    path = Path(path)
    specs = {spec["name"]: spec["datatype"] for spec in metadata.get("inputs", [])}
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            raw: dict[str, Any] = {name: npz[name] for name in npz.files}
    else:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected an object mapping input names to data")
    arrays, datatypes = {}, {}
    for name, value in raw.items():
        if name not in specs:
            raise ValueError(f"{path}: the model has no input {name!r} (it has {sorted(specs)})")
        datatype = specs[name]
        if isinstance(value, dict):
            data = np.array(value["data"], dtype=_NUMPY[datatype]).reshape(value["shape"])
        else:
            data = np.asarray(value, dtype=_NUMPY[datatype])
        if datatype == "BYTES":
            data = np.vectorize(lambda v: v.encode() if isinstance(v, str) else v, otypes=[object])(
                data
            )
        arrays[name], datatypes[name] = data, datatype
    missing = set(specs) - set(arrays)
    if missing:
        raise ValueError(f"{path}: no data for input(s) {sorted(missing)}")
    return arrays, datatypes

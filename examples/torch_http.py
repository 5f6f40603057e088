"""Serve a torch.nn.Module over HTTP (KServe v2), call it with tritonclient, swap its weights.

    python -m pip install -e ".[server,triton,torch]" && python examples/torch_http.py

The served model is the module itself (the form weight loading needs): batchkit runs its
batches under ``torch.inference_mode()`` in the thread that calls it, so its outputs carry no
autograd graph and go back to the client as numpy. An admin ``load`` request swaps new weights
in from a file in ``weights_dir`` while the server keeps answering; each response says which
version computed it. Ends by itself.
"""

from __future__ import annotations

import json
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
import tritonclient.http as httpclient

import batchkit.torch
from batchkit import BatchedModel
from batchkit.asgi import KServeApp, ServedModel, Tensor, serving

TOKEN = "s3cret"  # admin requests need it: `batchkit serve` reads BATCHKIT_ADMIN_TOKEN


def linear(scale: float) -> torch.nn.Linear:
    """A 4 -> 2 layer whose outputs are ``scale`` times the sum of the inputs."""
    module = torch.nn.Linear(4, 2)
    with torch.no_grad():
        module.weight.fill_(scale)
        module.bias.zero_()
    return module


def infer(client: httpclient.InferenceServerClient, row: list[float]) -> tuple[list[float], str]:
    x = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([row], dtype=np.float32))
    result = client.infer("linear", [x])
    version = result.get_response()["model_version"]
    return result.as_numpy("OUTPUT0")[0].tolist(), version


def load_weights(url: str, weights: str, version: str) -> None:
    """Ask the server to swap in ``weights`` (a file in its weights_dir) as ``version``."""
    body = json.dumps({"parameters": {"weights": weights, "version": version}}).encode()
    request = urllib.request.Request(
        f"http://{url}/v2/repository/models/linear/load",
        data=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as reply:
        assert reply.status == 200


def main() -> None:
    model = BatchedModel(
        linear(1.0),  # the module itself: weights can be swapped into it
        name="linear",
        version="1",
        max_batch_size=32,
        collate=batchkit.torch.stack,  # the rows (numpy) as one tensor
        split=batchkit.torch.split,  # the output tensor back into rows
    )
    served = ServedModel(
        model, inputs=[Tensor("INPUT0", "FP32", [4])], outputs=[Tensor("OUTPUT0", "FP32", [2])]
    )
    with tempfile.TemporaryDirectory() as weights_dir:
        torch.save(linear(10.0).state_dict(), Path(weights_dir, "v2.pt"))
        app = KServeApp([served], admin_token=TOKEN, weights_dir=weights_dir)
        with serving(app) as url:  # uvicorn in a background thread, on a free loopback port
            client = httpclient.InferenceServerClient(url)
            try:
                print("before:", *infer(client, [1.0, 2.0, 3.0, 4.0]))
                load_weights(url, "v2.pt", "2")
                print("after: ", *infer(client, [1.0, 2.0, 3.0, 4.0]))
            finally:
                client.close()


if __name__ == "__main__":
    main()

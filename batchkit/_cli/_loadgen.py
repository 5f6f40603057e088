"""The old home of the HTTP load generator, now ``batchkit.triton._loadgen`` (layer 2, beside the
tritonclient model, so the pytest plugin can use it too): every name still imports from here."""

from __future__ import annotations

import tritonclient.http.aio as aio

from ..triton._loadgen import ERROR_KINDS as ERROR_KINDS
from ..triton._loadgen import MAX_OUTSTANDING as MAX_OUTSTANDING
from ..triton._loadgen import Step as Step
from ..triton._loadgen import Target as Target
from ..triton._loadgen import classify as classify
from ..triton._loadgen import client_module as client_module
from ..triton._loadgen import closed_loop as closed_loop
from ..triton._loadgen import load_inputs as load_inputs
from ..triton._loadgen import open_loop as open_loop
from ..triton._loadgen import random_inputs as random_inputs

__all__ = (
    "ERROR_KINDS",
    "MAX_OUTSTANDING",
    "Step",
    "Target",
    "aio",
    "classify",
    "client_module",
    "closed_loop",
    "load_inputs",
    "open_loop",
    "random_inputs",
)

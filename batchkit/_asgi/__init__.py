"""The KServe v2 (Triton protocol) ASGI adapter; public names are in ``batchkit.asgi``."""

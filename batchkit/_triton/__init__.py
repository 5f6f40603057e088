"""The tritonclient-backed model (imports tritonclient; reached through ``batchkit.triton``)."""

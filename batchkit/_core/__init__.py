"""The engine: imports the standard library and anyio, nothing else."""

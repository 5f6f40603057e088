"""The pytest plugin's implementation; its public module is ``batchkit.pytest_plugin``.

Kept apart so that the ``pytest11`` entry point (``_entry``), which every pytest run loads,
imports nothing of the plugin proper: pytest imports ``batchkit.pytest_plugin`` itself when a
suite enables it.
"""

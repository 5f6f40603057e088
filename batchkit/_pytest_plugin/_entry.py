"""What the ``pytest11`` entry point loads in every pytest run: an ini switch, nothing more.

With ``batchkit_benchmark = true`` in the ini file, ``pytest_configure`` registers the plugin
proper (``batchkit.pytest_plugin``); without it, this module adds no fixture, hook or option
beyond the switch itself, so suites that do not ask for it run exactly as before.
"""

from __future__ import annotations

import pytest

__all__ = ("pytest_addoption", "pytest_configure")

PLUGIN = "batchkit.pytest_plugin"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declare the switch."""
    parser.addini(
        "batchkit_benchmark",
        type="bool",
        default=False,
        help="enable batchkit's pytest plugin (the batchkit_benchmark fixture)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the plugin when the switch is on (it may be registered already: a no-op)."""
    if config.getini("batchkit_benchmark") and config.pluginmanager.get_plugin(PLUGIN) is None:
        # Registered, not imported by name: a conftest may have imported it already (for
        # `sweep`), and pytest warns when asked to import a module that is imported already.
        from batchkit import pytest_plugin

        config.pluginmanager.register(pytest_plugin, PLUGIN)

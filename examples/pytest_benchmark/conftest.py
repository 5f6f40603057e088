"""Enable batchkit's pytest plugin for this suite (it is off everywhere else)."""

pytest_plugins = ["batchkit.pytest_plugin"]

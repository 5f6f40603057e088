"""The engine's fast lanes: each speeds up part of the general path, and can be turned off.

``_inline``: sync callers running batches in their own threads. (The plain asyncio calls and
staging still live in ``_engine.py``; see ``_plan.py`` for when each lane runs.)
"""

"""The engine's fast lanes: each speeds up part of the general path, and can be turned off.

- ``_asyncio``: ``PlainLane``, calls with default arguments on an asyncio engine in one frame;
- ``_staging``: ``StagingLane``, the next batch handed to a sync model's thread ahead of time;
- ``_inline``: ``InlineLane``, sync callers running batches in their own threads.

``_plan.plan_for`` decides which an engine runs; ``_policy`` makes their decisions; each lane's
docstring names the general code it speeds up and the invariants it keeps.
"""

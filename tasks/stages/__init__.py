"""The stages, one module each, named as the stage. Each declares ``STAGE = Stage(...)``
at its top (tasks/core/stage.py); tasks/registry.py collects them. Modules whose name
starts with ``_`` are helpers shared by stages, not stages."""

"""mailhub: a store-and-forward mail continuity hub (see DESIGN.md)."""

__version__ = "0.1.0"

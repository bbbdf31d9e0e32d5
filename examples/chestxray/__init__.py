"""NIH ChestX-ray14 example pipeline (see README.md)."""

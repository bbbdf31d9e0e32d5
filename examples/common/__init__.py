"""Pieces shared by the example pipelines: dataset readers for the real EyeQ and ChestX-ray14 formats."""

__all__ = ["datasets"]

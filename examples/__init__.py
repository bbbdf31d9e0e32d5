"""Example pipelines for ``mlcl_losses`` (not installed with the library; import from the repository root)."""

__all__: list[str] = []

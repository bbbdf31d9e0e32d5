"""Lightning example: CoMCL pre-training as a ``LightningModule``."""

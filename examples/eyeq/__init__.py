"""The EyeQ diabetic-retinopathy example pipeline."""

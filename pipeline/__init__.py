"""Raw data to a registered model."""

"""Training: data module, objectives, the Lightning system, the run and the export."""

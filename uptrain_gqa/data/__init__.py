"""Text for training, calibration and evaluation: documents, token streams, packed blocks."""

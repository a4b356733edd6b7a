"""What the model reads: frozen text and image encoders, the embedding stage, the TF-IDF block."""

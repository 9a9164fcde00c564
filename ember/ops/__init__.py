"""Small compute pieces the model is built from: rotary embeddings, RMSNorm, paged attention."""

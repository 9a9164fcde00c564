"""Model loading: GGUF files, Hugging Face folders, tokenizers and the local model registry."""

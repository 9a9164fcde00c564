"""Decoder models (one implementation for the Llama family) and building them from files."""

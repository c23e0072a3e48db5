"""Checkpoint I/O: Hugging Face folders on disk and on the Hub, read and written one tensor at a time."""

"""Data code: media reading, the feature cache, and jsonl conversations → padded training batches."""

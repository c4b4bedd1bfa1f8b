"""Data: reading sources, converting rows to conversations, validating, hashing, splitting and mixing records."""

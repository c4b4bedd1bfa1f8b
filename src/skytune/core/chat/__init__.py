"""Chat templates and the tokenization gate: rendering conversations exactly as the model will see them."""

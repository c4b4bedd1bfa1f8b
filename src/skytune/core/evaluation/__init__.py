"""Evaluation: batched generation behind one function (transformers or vLLM), and scoring answers."""

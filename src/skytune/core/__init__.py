"""Floor 1, the vocabulary: params, data, chat templates, models, training, evaluation and packaging, as plain
functions on plain data. Nothing here knows a DVC stage, a file named in dvc.yaml, or the CLI (ARCHITECTURE.md)."""

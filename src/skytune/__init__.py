"""skytune: a reproducible QLoRA fine-tuning pipeline (DVC stages under `skytune.stages`)."""

"""Training: the SFT trainer, its callbacks and DVCLive logging, checkpoints, distributed helpers and MFU."""

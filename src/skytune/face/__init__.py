"""Floor 3, the user's face: the CLI and the report page, and `cloud`, the laptop-side tools that launch SkyPilot
jobs. Nothing below imports from here (ARCHITECTURE.md)."""

"""Quality metrics: SWD (no weights), FID and KID (a local Inception weights file); see registry.py."""

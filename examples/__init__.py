"""Examples of fine-tuning with the longexposure backend; run as ``python -m examples.<name>``."""

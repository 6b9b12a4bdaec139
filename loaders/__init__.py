"""Loading and caching the Qwen-Image-Edit pipeline."""

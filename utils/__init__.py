"""Image conversion, sizing and the bridge to ComfyUI's runtime."""

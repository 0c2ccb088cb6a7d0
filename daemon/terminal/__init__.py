"""The terminal client, `comfy-progress generate`: a prompt in, a progress bar, an image out."""

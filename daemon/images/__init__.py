"""Images: the generated-image store, its retention, and live previews."""

"""Files: images (PNG 8/16-bit and Pillow formats), measurement files, strict JSON, atomic writes."""

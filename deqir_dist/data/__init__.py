"""Photographs and crops for training and validating the built-in prior (scikit-image's photos)."""

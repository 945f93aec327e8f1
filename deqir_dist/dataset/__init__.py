"""Restoring many files: tasks and their parameters, inputs (folders, manifests), items, results
logs and resume. No Ray here."""

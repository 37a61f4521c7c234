"""Rendering result objects: terminal tables, JSON, CSV, Markdown, PNG plots and the HTML report."""

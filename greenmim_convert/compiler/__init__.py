"""Compile time: capture a model as an ATen graph, annotate layouts, run the pass pipeline."""

"""Handlers that adapt Gradio values to the engine, and the figures the app shows.

`app.py` holds the layout and the wiring; everything that computes lives here:
`context` (models shared read-only, where outputs go), `session` (per-user state),
`sampling`, `compare`, `trajectory`, `upsample_lab` (one module per tab),
`images`, `metrics` and `plots` (pure helpers), `gpu` (Hugging Face ZeroGPU).
"""

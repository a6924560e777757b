"""Evaluation: the M3D-Bench tasks (retrieval now; generation, VQA, grounding and segmentation later)."""

"""m3d-lite: build a 3D medical multimodal LLM the way M3D does."""

__version__ = "0.1.0"

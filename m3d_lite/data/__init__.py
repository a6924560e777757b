"""Data: the M3D-Phantom generator, its texts, the M3D file formats and preprocessing."""

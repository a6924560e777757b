"""Test-session settings that must be in place before torch is imported anywhere."""

import os

# Offline, quiet, and polite on a shared 2-core machine: with the default active OpenMP wait, torch's
# threads spin while another process runs and a 0.1 s step can take 2 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

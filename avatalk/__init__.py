"""avatalk: a real-time talking-avatar conversation server."""

import os

# llama.cpp (GNU OpenMP) and CTranslate2 (Intel OpenMP) keep their worker threads
# spinning after each call. On a small CPU that spinning starves the other models
# and the event loop, adding hundreds of milliseconds per stage, so idle OpenMP
# threads sleep instead. Set before any model library loads; explicit user settings win.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("KMP_BLOCKTIME", "0")

__version__ = "0.1.0"

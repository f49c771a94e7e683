"""Generation: requests, the MusicGen engine, audio in and out; no Discord here."""

import os

# Before torch loads libgomp: its worker threads otherwise spin at every parallel region
# waiting for each other, and on a CPU shared with other processes a descheduled sibling
# turns each region into a wait of milliseconds. Measured here: 1.4 ms a step for the debug
# model with one thread, 250 ms with two; 2 ms with two once passive (README, "Benchmark").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

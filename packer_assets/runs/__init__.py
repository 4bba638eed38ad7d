"""Around runs: one run per key (locks), processes, notifications."""

"""Settings: the validated settings object and the env files it reads."""

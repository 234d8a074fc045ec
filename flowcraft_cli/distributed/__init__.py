"""The distributed runtime: Redis holds every run's state, arq carries one job per node step."""

"""Storage (local and object stores), the checkpoint state and the run lock."""

"""Operations: logs, metrics, progress, environments."""

"""Export Trigger.dev sessions into hive-partitioned Parquet."""

__version__ = "0.1.0"

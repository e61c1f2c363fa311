"""The dataset: schema, flatten, Parquet sink, layout, compaction, verify, load, manifests."""

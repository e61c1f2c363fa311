"""Jobs: the incremental run, backfill and change capture over one core."""

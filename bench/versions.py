"""`make bench-versions`: the known-versions check on a 10,000,000-version dataset.

Builds the dataset with `bench.dataset` (no API), then, in a child process measured with
wait4, replays what a full refresh does: walk every stored session newest partition
first, in pages of 100 rows, each page checked against the stored versions
(`StoredVersions.unseen`), half of the pages with their `updated_at` moved on (a version
not stored yet). Reports the time, pages per second and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.common import measure, write_results

PAGE = 100


def check(out: str) -> dict[str, object]:
    """The child: the walk and the check, nothing else."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.dataset.layout import files_by_partition, iter_batches
    from pipeline.dataset.sink import use_lean_memory_pool
    from pipeline.dataset.versions import StoredVersions
    from pipeline.store.storage import Storage

    use_lean_memory_pool()
    storage = Storage(out)
    versions = StoredVersions(storage, None, None, exclude_run="bench")
    started = time.perf_counter()
    pages = rows = unseen = 0
    columns = ["id", "created_at", "updated_at"]
    for _, files in sorted(files_by_partition(storage).items(), reverse=True):
        for data_file in files:
            for batch in iter_batches(storage, data_file.path, columns, rows=PAGE):
                page = pa.Table.from_batches([batch])
                if pages % 2:  # a newer version of each session on this page
                    moved = pc.add(page["updated_at"].cast(pa.int64()), 1)
                    page = page.set_column(2, "updated_at", moved.cast(page["updated_at"].type))
                fresh = versions.unseen(page)
                unseen += pc.sum(fresh).as_py() or 0
                pages += 1
                rows += page.num_rows
    return {
        "rows": rows,
        "pages": pages,
        "unseen": unseen,
        "partitions_read": versions.partitions_read,
        "seconds": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", type=Path, help="an existing dataset (else built here)")
    parser.add_argument("--versions", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(check(args.child)))
        return
    with tempfile.TemporaryDirectory() as temp:
        out = args.dataset or Path(temp)
        if args.dataset is None:
            build = measure([sys.executable, "-m", "bench.dataset", str(out), "--versions",
                             str(args.versions), "--days", str(args.days)])
            assert build.returncode == 0, build
            print(build.stdout.strip())
        result = measure([sys.executable, "-m", "bench.versions", "--child", str(out)])
        assert result.returncode == 0, result
        row = json.loads(result.stdout)
        row["pages_per_second"] = round(row["pages"] / row["seconds"])
        row["peak_rss_mb"] = round(result.peak_rss_mb, 1)
        row["process_seconds"] = round(result.seconds, 2)
    write_results("versions", [row])


if __name__ == "__main__":
    main()

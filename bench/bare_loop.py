"""The baseline: a bare loop that only fetches and parses every page with httpx.

What a hand-written script does before it writes anything: `page[size]=100`, follow
`pagination.next`, `response.json()`. Prints the number of sessions it saw.
"""

import os
import sys

import httpx


def main(url: str) -> None:
    headers = {"Authorization": f"Bearer {os.environ['TRIGGER_SECRET_KEY']}"}
    count = 0
    params = {"page[size]": "100"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        while True:
            body = client.get("/api/v1/sessions", params=params).json()
            count += len(body["data"])
            following = body.get("pagination", {}).get("next")
            if not following:
                break
            params["page[after]"] = following
    print(count)


if __name__ == "__main__":
    main(sys.argv[1])

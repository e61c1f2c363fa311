"""The Trigger.dev API side: HTTP client, rate-limit pacing, the page walker."""

"""Recipes that run the export from an orchestrator (docs/orchestrators.md), run by tests."""

"""Leaderboard, statistics, formats and the report: they read the store only, and import no Ray."""

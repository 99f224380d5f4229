"""Agents that search schedules: search drivers and the learned cost model."""

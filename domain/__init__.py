"""The storyline domain model: stages, typed events, the Story aggregate and its rules.

Nothing here performs I/O or imports from api/, runners/, projections/ or service/.
"""

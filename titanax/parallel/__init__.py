"""The parallel transforms and what they share (rules, plans, collectives)."""

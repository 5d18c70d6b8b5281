"""Helpers shared by the pattern-matching transforms: node queries, graph edits, mask probing."""

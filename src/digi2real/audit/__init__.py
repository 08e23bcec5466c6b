"""`audit`: contamination, distinctness, consistency, variation and realism gap of a face set (issue 14)."""

"""Projects and their caller keys: the records, administration, usage reports."""

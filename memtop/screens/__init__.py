"""Textual screens. They receive Snapshots (apply_snapshot) and never do I/O themselves."""

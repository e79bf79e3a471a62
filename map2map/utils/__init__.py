"""Small helpers shared by several layers (imports by name, atomic files)."""

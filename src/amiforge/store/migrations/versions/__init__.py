"""One module per schema revision, oldest first. Each is self-contained: it never imports the live table
definitions from schema.py, so that old revisions keep meaning what they meant."""

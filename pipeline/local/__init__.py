"""One machine: the interfaces embedded (SQLite, in process, a directory) and `harvest local`."""

"""The ground floor: errors, files written atomically, paths, typed result records, the
environment a result records, untrusted-file readers and process helpers. Imports nothing of qbench."""

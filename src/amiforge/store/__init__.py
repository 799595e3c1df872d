"""The registry: versions, artifacts, layers, boot reports and the hash-chained event log."""

"""The registry: versions, artifacts, layers, boot reports, the supply chain, rollouts, channels and the hash-chained
event log. `interface.Store` is what the rest of amiforge uses; `sql.SqlStore` (SQLite or PostgreSQL) implements it,
one module per aggregate (see sql.py)."""

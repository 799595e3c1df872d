"""The HTTP server of `amiforge serve` (floor 1, beside the CLI: it parses requests, calls the service layer and
renders). Today it serves `/metrics` and `/healthz`; the web console will grow here."""

"""Downloading the vulnerability feeds `amiforge vulndb update` reads: osv.dev's Debian export, the Debian Security
Tracker's JSON and NVD's CVE API. Networking and files only: what is downloaded is checked (status, length, size
cap, checksums, the shape the feed must have) and kept only whole; reading it into advisories is not done here.
"""

from amiforge.feeds.download import MAX_REDIRECTS, Downloaded, HTTPStatusError, check_redirect, check_url, download
from amiforge.feeds.sources import SOURCES, FetchedSource, Source, fetch_source, nvd_interval

__all__ = [
    "MAX_REDIRECTS",
    "SOURCES",
    "Downloaded",
    "FetchedSource",
    "HTTPStatusError",
    "Source",
    "check_redirect",
    "check_url",
    "download",
    "fetch_source",
    "nvd_interval",
]

"""What is inside an image: SBOM (dpkg), CVEs (OSV advisories + dpkg version order), secrets and residue."""

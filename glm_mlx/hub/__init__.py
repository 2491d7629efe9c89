"""The model hub: listing and downloading repos, transfers, uploads, remote-name checks."""

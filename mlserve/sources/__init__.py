"""Where model versions come from besides the repository on disk (which ``mlserve.repository`` scans)."""

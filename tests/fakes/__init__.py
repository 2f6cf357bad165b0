"""Test doubles that speak real protocols (e.g. a fake Google Drive v3 HTTP server)."""

"""Gin files (package data)."""

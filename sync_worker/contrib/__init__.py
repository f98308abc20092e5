"""Integrations with frameworks (imported only by projects that use them)."""

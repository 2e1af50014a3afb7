"""Sinks: adapters that deliver spoken chunks and answers to a transport."""

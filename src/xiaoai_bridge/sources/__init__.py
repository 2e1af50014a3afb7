"""Sources: adapters that turn transport events into utterances."""

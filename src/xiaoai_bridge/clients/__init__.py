"""Protocol clients that know nothing of the pipeline."""

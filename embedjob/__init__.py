"""embedjob."""

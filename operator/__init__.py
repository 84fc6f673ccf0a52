"""embedjob.operator: the kopf operator that reconciles EmbeddingJob resources. Never imports torch."""

"""embedjob.worker: the shard pipeline (tar -> decode -> CLIP preprocess -> model -> outputs) and its
Celery task."""

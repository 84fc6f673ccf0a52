"""``embedjob bench``, a tool above the worker: the worker's throughput against its own limits and
a baseline, in one run.

It makes its own WebDataset shards (synthetic JPEGs at a chosen size, on local disk or an S3
endpoint through embedjob's storage code), then measures, one after the other on the same machine:

1. **decode limit**: tar read + decode + preprocessing alone (no model), through the worker's own
   reader and decode pool on every CPU the process may use (``PreparedStream``), the pool's kind a
   parameter (``--decode-pool``);
2. **model limit**: the model's forward on ready uint8 batches, at the chosen device, precision,
   batch size and compile mode, on one thread that also warmed it up (compiled functions keep
   thread-local state);
3. **baseline**: the usual stage: sequential decode, Hugging Face's CLIP image processor on the
   CPU, ``CLIPModel.get_image_features`` in fp32, batches of 32;
4. **embedjob e2e**: the real worker path, the Celery task body ``ShardRunner.run`` (lease, heartbeat,
   model load, pipeline, outputs written) over every shard, in one worker process or
   ``--processes-per-gpu`` of them; start-up (to the first batch written) apart from the steady
   rate, and the CPU the task's process itself spends per image.

The **limit** is what a perfect pipeline could reach: ``min(decode, model)`` only where decode and
model do not share compute (the exact path feeding a GPU); where they share it (the CPU's cores, or
the device's SMs for the GPU fast path's decode) ``1 / (1/decode + 1/model)``. The report
gives e2e/limit and e2e/baseline, peak memory (PSS of the process and its decode workers), CPU use,
and on CUDA the GPU busy fraction and the model's achieved TFLOP/s against a dense matmul measured in
the same run. With ``--preprocessing fast`` (or ``both``) it also measures the fast path's deviation
from the exact one (PSNR and mean absolute difference of the crops, cosine of the embeddings on a
random-weight ViT-L/14).

Models have random weights (no download): ``tiny`` (the test CLIP: pipeline overhead) or
``vit-l14`` (ViT-L/14's real shapes: the real compute cost).

Modules: ``entry`` (BenchConfig, the private Redis, run_bench), ``synth`` (the shards), ``monitor``
(/proc), ``measure`` (decode limit, model limit, baseline, FLOPs, limits), ``e2e``, ``deviation``,
``report``. Only the CLI imports this package.
"""

from embedjob.bench.entry import MEASUREMENTS, MODELS, BenchConfig, bench, run_bench
from embedjob.bench.report import format_report, summary_markdown, write_json

__all__ = ["MEASUREMENTS", "MODELS", "BenchConfig", "bench", "format_report", "run_bench", "summary_markdown",
           "write_json"]

"""`m2m infer` and `m2m test`: tiled whole-box inference, pipelined, into a prediction store.

The client checks everything it can before any work starts (store, fields,
checkpoint, model fit, norms, tile sizes), plans tiles with
`map2map.tiles.TilePlan`, creates the output store (or resumes it) and runs
the batches of tiles still to do.  Where they run: without ``--scheduler``
and with one worker (the default on a CPU or one GPU) in the client's own
process, on threads, with no cluster to start; with ``--workers N`` on a
local cluster of N processes, started in a thread while the client plans;
with ``--scheduler`` as Dask tasks on that cluster.  Either way the batches
go in *streams* (consecutive batches, one Dask task each), and each stream
runs as a pipeline of three threads (`map2map.infer.worker`): while the
model runs on a batch, the next batch's windows are

1. read (tile + halo, periodic wrap) through
   `map2map.data.fieldio.FieldStack`, the layer training reads through, which
   applies the input norms and stacks the fields along channels (the batch
   after is hinted to the kernel meanwhile), and the previous batch's output is
2. narrowed to the tile (``scale_factor`` times finer), optionally scored
   against the target field, un-normalised,
3. written into the tile's own output region, a union of whole output
   shards that no other task touches, fsynced, and then recorded as done
   with one empty marker file per tile (`markers`).

The model is loaded once per process and kept in its `WorkerState` (eval
mode, inference mode, one forward pass per batch, averaged over symmetries
with ``--tta``, `tta`).  A rerun with the same settings skips tiles that have
a marker (found with one directory scan); the completion mark (and the
per-sample losses) is written only when every tile is done, and the markers
are removed just before it.  Every tile reads a window of the same size
whose origin differs from the whole-box window's by a multiple of the model's
total stride, so the stitched result equals one forward pass over the whole
periodically padded box.

The input and output stores may be URLs (`map2map.storage`, with
``--storage-options``, which every task carries to its worker).  An output
in object storage is written the same way except where object storage
differs: each shard is one object stored with one PUT and no fsync, the
markers are empty objects under a prefix (listed once), there is no writer
lock, and a complete store there is never replaced (``--overwrite`` is
refused: there is no rename to swap a new one in).

The package, in the order a run goes through it: `specs` (the config and
the small specs every task gets), `defaults` (the checkpoint's model card
fills what the command leaves out), `inputs` and `planning` (checked on the
client before any work), `output` (the prediction store), `cluster`
(where the tiles run, streams, progress), `worker` (the pipeline), `tta`,
`styles` (a styled model's styles per sample, and ``--velocity``: a second
output field, written, fsynced and marked with the prediction),
`markers` (finished tiles, for resuming), `engine` (`run`, i.e. `m2m infer`)
and `npy` (`run_test`, i.e. `m2m test`).
"""

from map2map.infer.engine import InferSummary, run
from map2map.infer.markers import mark_done, read_done
from map2map.infer.npy import out_npy_path, write_npy
from map2map.infer.npy import run as run_test
from map2map.infer.specs import DONE_DIR, PARTIAL, InferConfig

__all__ = ["DONE_DIR", "PARTIAL", "InferConfig", "InferSummary", "mark_done", "out_npy_path", "read_done", "run",
           "run_test", "write_npy"]
